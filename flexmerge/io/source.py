"""Lazy checkpoint sources: keys and shapes up front, tensors only when asked for.

safetensors files are read tensor by tensor (or row range by row range) with `pread`, so a
streaming pass holds only what it works on; torch files are loaded with `weights_only=True`
and `mmap=True` where the format allows (pickle-based files cannot be read partially).
Which source reads a given path (file, Hugging Face directory, PEFT adapter) is decided in
`flexmerge.io.open`; this module knows nothing of adapters.
"""

from __future__ import annotations

import json
import math
import os
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from flexmerge.errors import CheckpointError
from flexmerge.paths import inside

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                   "pytorch_model.bin", "pytorch_model.bin.index.json")
# config and tokenizer files of a Hugging Face directory that an export carries along, in the
# groups that travel together: a task takes each group whole from its own directory, or whole
# from the base's when it has none of the group (a tokenizer is never mixed from two directories)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "spiece.model", "tokenizer.model", "added_tokens.json")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
HF_SIDE_GROUPS = {"config": ("config.json",), "generation": ("generation_config.json",),
                  "tokenizer": TOKENIZER_FILES, "chat template": CHAT_TEMPLATE_FILES,
                  "preprocessor": ("preprocessor_config.json",)}
HF_SIDE_FILES = tuple(f for group in HF_SIDE_GROUPS.values() for f in group)


def rows_shape(shape: tuple[int, ...], rows: tuple[int, int] | None) -> tuple[int, ...]:
    """The shape of rows [start, stop) of a tensor of `shape` (rows=None: the whole tensor)."""
    return shape if rows is None else (rows[1] - rows[0], *shape[1:])


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


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
            by_shard = _shard_of_key(path, weight_map)
            self._shard_paths = sorted(set(by_shard.values()))
        else:
            weight_map, by_shard = None, {}
            self._shard_paths = [path]
        self._fds: list[int] = []
        self._entries: dict[str, _Entry] = {}
        for shard in self._shard_paths:
            fd, entries = _open_safetensors(shard)
            self._fds.append(fd)
            for key, e in entries.items():
                if weight_map is None or by_shard.get(key) == shard:
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


HEADER_MAX_BYTES = 100 << 20  # the safetensors library's own limit on a header


def _open_safetensors(p: Path) -> tuple[int, dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]]:
    """Parse a safetensors header (u64 length + JSON, offsets relative to the data section).

    The header is untrusted: every field is type-checked and every tensor must lie inside the
    file with exactly the bytes its shape and dtype need, so a read can never go astray."""
    if not p.exists():
        raise CheckpointError(f"shard not found: {p}")
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError as e:
        raise CheckpointError(f"{p}: cannot open ({e.strerror or e})") from e
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or n > HEADER_MAX_BYTES or 8 + n > size:
            raise ValueError("bad header length")
        entries = parse_safetensors_header(os.pread(fd, n, 8), data_start=8 + n, file_size=size)
        return fd, entries
    except (ValueError, RecursionError) as e:  # JSON and UTF-8 decoding errors are ValueErrors
        os.close(fd)
        raise CheckpointError(f"{p}: not a readable safetensors file ({str(e)[:200]})") from None
    except OSError as e:
        os.close(fd)
        raise CheckpointError(f"{p}: cannot read ({e.strerror or e})") from e


def parse_safetensors_header(raw: bytes, data_start: int, file_size: int
                             ) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """{key: (dtype, shape, begin, end)} with absolute offsets; ValueError on anything malformed."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ValueError("the header nests JSON too deeply") from None
    if not isinstance(header, dict):
        raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
    entries = {}
    for key, v in header.items():
        if key == "__metadata__":
            if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
                raise ValueError("__metadata__ must be an object of strings")
            continue
        if not isinstance(v, dict):
            raise ValueError(f"tensor {key!r}: entry is not an object")
        if not isinstance(v.get("dtype"), str) or v["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {key!r}: unsupported dtype {v.get('dtype')!r}")
        dtype = SAFETENSORS_DTYPES[v["dtype"]]
        shape, offsets = v.get("shape"), v.get("data_offsets")
        if not isinstance(shape, list) or not all(type(x) is int and x >= 0 for x in shape):
            raise ValueError(f"tensor {key!r}: shape {str(shape)[:80]} is not a list of non-negative integers")
        if len(shape) > 64 or math.prod(max(x, 1) for x in shape) >= 1 << 62:  # torch's own limits
            raise ValueError(f"tensor {key!r}: shape {str(shape)[:80]} is beyond any tensor torch can hold")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(x) is int for x in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"tensor {key!r}: data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end")
        begin, end = data_start + offsets[0], data_start + offsets[1]
        if end - begin != math.prod(shape) * dtype.itemsize or end > file_size:
            raise ValueError(f"tensor {key!r}: offsets do not match its shape/dtype or the file size")
        entries[key] = (dtype, tuple(shape), begin, end)
    spans = sorted((e[2], e[3], k) for k, e in entries.items() if e[3] > e[2])
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise ValueError(f"tensors {a!r} and {b!r} overlap in the file")
    return entries


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the header names {k!r} twice")
        out[k] = v
    return out


class TorchFileSource:
    """A torch `.pt`/`.bin` state dict (or a sharded `pytorch_model.bin.index.json`)."""

    def __init__(self, path: Path, hf_dir: Path | None = None):
        self.path, self.hf_dir = path, hf_dir
        if path.name.endswith(".index.json"):
            self._paths = sorted(set(_shard_of_key(path, _read_index(path)).values()))
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


def open_file(p: Path, hf_dir: Path | None) -> CheckpointSource:
    """A checkpoint file by its name: safetensors (or its shard index), else a torch state dict."""
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
    """The index's {tensor name: shard file name}, every entry a string (paths are checked by the caller)."""
    try:
        weight_map = json.loads(_read_small(p))["weight_map"]
    except (ValueError, RecursionError, KeyError, TypeError) as e:  # incl. JSON and UTF-8 decoding errors
        raise CheckpointError(f"{p}: not a valid shard index (needs a 'weight_map' object): {str(e)[:200]}") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{p}: 'weight_map' must be a non-empty object of tensor name -> shard file")
    bad = [(k, v) for k, v in weight_map.items() if not isinstance(v, str)]
    if bad:
        raise CheckpointError(f"{p}: 'weight_map' entry {bad[0][0]!r} names {bad[0][1]!r}, not a shard file name")
    return weight_map


def _shard_of_key(index: Path, weight_map: dict[str, str]) -> dict[str, Path]:
    """{tensor name: its shard}, each distinct shard name resolved once: inside the index's
    directory, or beside the file a symlinked index really is."""
    target_dir = index.resolve().parent
    resolved = {name: inside(index.parent, name, f"shard named by {index.name}", also=target_dir)
                for name in set(weight_map.values())}
    return {key: resolved[name] for key, name in weight_map.items()}


INDEX_MAX_BYTES = 64 << 20  # an index lists names only; anything larger is not one


def _read_small(p: Path, limit: int = INDEX_MAX_BYTES) -> bytes:
    try:
        with open(p, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read ({e.strerror or e})") from e
    if len(data) > limit:
        raise CheckpointError(f"{p}: larger than {limit >> 20} MiB; not a shard index")
    return data


def _check_torch_zip(p: Path) -> None:
    """Refuse torch files whose tensors would be inflated in memory before any check.

    `torch.save` writes a zip archive with every entry stored uncompressed, which `mmap=True`
    maps instead of reading; a compressed entry (a zip bomb, or a re-packed file) would be
    expanded whole, and an entry claiming more bytes than the file holds is lying."""
    try:
        os.close(os.open(p, os.O_RDONLY))
        if not zipfile.is_zipfile(p):
            return  # legacy format: read whole, but never more than the file's own size
        with zipfile.ZipFile(p) as z:
            size = p.stat().st_size
            for info in z.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    raise CheckpointError(
                        f"{p}: entry {info.filename!r} is compressed; torch.save never writes compressed "
                        "entries and they would be inflated in memory before any check: re-save the state dict")
                if info.file_size > size:
                    raise CheckpointError(f"{p}: entry {info.filename!r} claims {info.file_size} bytes, more "
                                          f"than the file's {size}: corrupted or hostile")
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read ({e.strerror or e})") from e
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{p}: corrupted torch archive ({e})") from e


def _load_torch_state_dict(p: Path) -> dict[str, torch.Tensor]:
    if not p.exists():
        raise CheckpointError(f"shard not found: {p}")
    _check_torch_zip(p)
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
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
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


def file_record(path: Path) -> dict[str, object]:
    """Provenance of an input file: where it was and its size (its content is hashed by the
    validation pass, per tensor, as it reads every byte anyway)."""
    return {"file": str(path), "bytes": path.stat().st_size}
