"""Lazy checkpoint sources: keys and shapes up front, tensors only when asked for.

safetensors files are read tensor by tensor (or row range by row range) with `pread`, so a
streaming pass holds only what it works on; torch files are loaded with `weights_only=True`
and `mmap=True` where the format allows (pickle-based files cannot be read partially).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from flexmerge.errors import CheckpointError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                   "pytorch_model.bin", "pytorch_model.bin.index.json")


def rows_shape(shape: tuple[int, ...], rows: tuple[int, int] | None) -> tuple[int, ...]:
    """The shape of rows [start, stop) of a tensor of `shape` (rows=None: the whole tensor)."""
    return shape if rows is None else (rows[1] - rows[0], *shape[1:])


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class CheckpointSource(Protocol):
    """What flexmerge needs from a checkpoint: names, metadata, and one tensor at a time."""

    path: Path
    hf_dir: Path | None  # the Hugging Face model directory, when the input was one

    def keys(self) -> list[str]: ...
    def meta(self, key: str) -> TensorMeta: ...
    def read(self, key: str) -> torch.Tensor: ...
    def files(self) -> list[Path]: ...


class SafetensorsSource:
    """One safetensors file, or a sharded set described by `model.safetensors.index.json`.

    The header is parsed once; each tensor (or row range) is then read with `pread` into a fresh
    tensor, or into the caller's reused buffer (`read_into`). Unlike a memory map, nothing read
    stays resident in the process after the tensor is released, so the peak RSS of a streaming
    pass is bounded by what the pass holds, whatever the size of the files. `bytes_read` counts what was read.
    """

    def __init__(self, path: Path, hf_dir: Path | None = None):
        self.path, self.hf_dir = path, hf_dir
        self.bytes_read = 0
        self._lock = threading.Lock()
        if path.name.endswith(".index.json"):
            weight_map = _read_index(path)
            self._shard_paths = [path.parent / n for n in sorted(set(weight_map.values()))]
        else:
            weight_map = None
            self._shard_paths = [path]
        self._fds: list[int] = []
        self._entries: dict[str, _Entry] = {}
        for shard in self._shard_paths:
            fd, entries = _open_safetensors(shard)
            self._fds.append(fd)
            for key, e in entries.items():
                if weight_map is None or weight_map.get(key) == shard.name:
                    self._entries[key] = _Entry(len(self._fds) - 1, *e)
        if weight_map is not None:
            missing = [k for k in weight_map if k not in self._entries]
            if missing:
                raise CheckpointError(f"{path}: keys {missing[:5]} are listed in the index but not in their shards")

    def keys(self) -> list[str]:
        return list(self._entries)

    def meta(self, key: str) -> TensorMeta:
        e = self._entry(key)
        return TensorMeta(e.shape, e.dtype)

    def read(self, key: str) -> torch.Tensor:
        return self._pread(self._entry(key), None)

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self._pread(self._entry(key), (start, stop))

    def files(self) -> list[Path]:
        return list(self._shard_paths)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _entry(self, key: str) -> "_Entry":
        try:
            return self._entries[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {key!r}") from None

    def read_into(self, key: str, rows: tuple[int, int] | None, out: torch.Tensor) -> None:
        """`key` (or rows [start, stop) of it) into `out`, contiguous and of its dtype: no allocation."""
        self._pread_into(self._entry(key), rows, out)

    def _pread(self, e: "_Entry", rows: tuple[int, int] | None) -> torch.Tensor:
        out = torch.empty(rows_shape(e.shape, rows), dtype=e.dtype)  # not zeroed: pread fills every byte
        self._pread_into(e, rows, out)
        return out

    def _pread_into(self, e: "_Entry", rows: tuple[int, int] | None, out: torch.Tensor) -> None:
        offset, nbytes = e.begin, e.end - e.begin
        if rows is not None:
            row_bytes = nbytes // max(e.shape[0], 1)
            offset, nbytes = e.begin + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes
        if out.dtype != e.dtype or not out.is_contiguous() or out.numel() * out.element_size() != nbytes:
            raise ValueError(f"buffer of {tuple(out.shape)} {out.dtype} cannot hold {nbytes} bytes of {e.dtype}")
        if nbytes == 0:
            return
        view, got = memoryview(out.view(-1).view(torch.uint8).numpy()), 0
        while got < nbytes:
            n = os.preadv(self._fds[e.file], [view[got:]], offset + got)
            if n == 0:
                raise CheckpointError(f"{self._shard_paths[e.file]}: file ends early (truncated?)")
            got += n
        with self._lock:  # reads may come from several threads
            self.bytes_read += nbytes


@dataclass(frozen=True)
class _Entry:
    file: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


def _open_safetensors(p: Path) -> tuple[int, dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]]:
    """Parse a safetensors header (u64 length + JSON, offsets relative to the data section)."""
    if not p.exists():
        raise CheckpointError(f"shard not found: {p}")
    fd = os.open(p, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or 8 + n > size:
            raise ValueError("bad header length")
        header = json.loads(os.pread(fd, n, 8))
        entries = {}
        for key, v in header.items():
            if key == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES[v["dtype"]]
            shape = tuple(int(x) for x in v["shape"])
            begin, end = (8 + n + int(x) for x in v["data_offsets"])
            numel = 1
            for d in shape:
                numel *= d
            if end - begin != numel * dtype.itemsize or end > size:
                raise ValueError(f"tensor {key!r}: offsets do not match its shape/dtype or the file size")
            entries[key] = (dtype, shape, begin, end)
        return fd, entries
    except (ValueError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        os.close(fd)
        raise CheckpointError(f"{p}: not a readable safetensors file ({e})") from e


class TorchFileSource:
    """A torch `.pt`/`.bin` state dict (or a sharded `pytorch_model.bin.index.json`)."""

    def __init__(self, path: Path, hf_dir: Path | None = None):
        self.path, self.hf_dir = path, hf_dir
        if path.name.endswith(".index.json"):
            names = sorted(set(_read_index(path).values()))
            self._paths = [path.parent / n for n in names]
        else:
            self._paths = [path]
        self._tensors: dict[str, torch.Tensor] = {}
        for p in self._paths:
            self._tensors.update(_load_torch_state_dict(p))

    def keys(self) -> list[str]:
        return list(self._tensors)

    def meta(self, key: str) -> TensorMeta:
        t = self._tensor(key)
        return TensorMeta(tuple(t.shape), t.dtype)

    def read(self, key: str) -> torch.Tensor:
        return self._tensor(key)

    def files(self) -> list[Path]:
        return list(self._paths)

    def _tensor(self, key: str) -> torch.Tensor:
        try:
            return self._tensors[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {key!r}") from None


def open_checkpoint(path: str | Path) -> CheckpointSource:
    """Open a safetensors file, sharded index, torch state dict or Hugging Face model directory."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_dir():
        for name in HF_WEIGHT_FILES:
            if (p / name).exists():
                return _open_file(p / name, hf_dir=p)
        raise CheckpointError(
            f"{p}: a directory must hold one of {', '.join(HF_WEIGHT_FILES)}; found "
            f"{sorted(x.name for x in p.iterdir())[:10]}"
        )
    return _open_file(p, hf_dir=None)


def _open_file(p: Path, hf_dir: Path | None) -> CheckpointSource:
    name = p.name
    if name.endswith(".safetensors") or name.endswith(".safetensors.index.json"):
        return SafetensorsSource(p, hf_dir)
    if name.endswith((".pt", ".pth", ".bin", ".bin.index.json")):
        return TorchFileSource(p, hf_dir)
    raise CheckpointError(
        f"{p}: unknown checkpoint format; expected .safetensors, a sharded *.index.json, "
        ".pt/.pth/.bin, or a Hugging Face model directory"
    )


def _read_index(p: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(p.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{p}: not a valid shard index (needs a 'weight_map' object): {e}") from e
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{p}: 'weight_map' is empty")
    return weight_map


def _load_torch_state_dict(p: Path) -> dict[str, torch.Tensor]:
    if not p.exists():
        raise CheckpointError(f"shard not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{p}: cannot load as a weights-only torch state dict ({e})") from e
    except Exception as e:
        raise CheckpointError(
            f"{p}: cannot load as a weights-only torch state dict ({e}); pickled nn.Module "
            "objects are refused: save `model.state_dict()` instead"
        ) from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{p}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    return obj


def read_rows(source: CheckpointSource, key: str, rows: tuple[int, int] | None) -> torch.Tensor:
    """Read a tensor, or only rows [start, stop) of its first dimension (lazily for safetensors)."""
    if rows is None:
        return source.read(key)
    start, stop = rows
    if isinstance(source, SafetensorsSource):
        return source.read_rows(key, start, stop)
    return source.read(key)[start:stop]


def read_rows_into(source: CheckpointSource, key: str, rows: tuple[int, int] | None, out: torch.Tensor) -> None:
    """`read_rows` into a caller's buffer of the source's dtype: streaming passes reuse one."""
    if isinstance(source, SafetensorsSource):
        source.read_into(key, rows, out)
        return
    out.copy_(read_rows(source, key, rows).reshape(out.shape))


def fingerprint(path: Path, edge_bytes: int = 1 << 20) -> dict[str, object]:
    """A cheap provenance record of an input file: size and a hash of its first and last MiB.

    A full hash of every input would cost another read of all models; this catches the usual
    mix-ups (another file, a re-trained checkpoint) at no cost.
    """
    import hashlib

    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(edge_bytes))
        if size > edge_bytes:
            f.seek(max(edge_bytes, size - edge_bytes))
            h.update(f.read(edge_bytes))
    return {"file": str(path), "bytes": size, "edge_sha256": h.hexdigest()}
