"""Lazy checkpoint sources: keys and shapes up front, tensors only when asked for.

safetensors files are memory-mapped by `safe_open`, so reading one tensor touches only its
bytes; torch files are loaded with `weights_only=True` and `mmap=True` where the format allows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from flexmerge.errors import CheckpointError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                   "pytorch_model.bin", "pytorch_model.bin.index.json")


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
    """One safetensors file, or a sharded set described by `model.safetensors.index.json`."""

    def __init__(self, path: Path, hf_dir: Path | None = None):
        self.path, self.hf_dir = path, hf_dir
        if path.name.endswith(".index.json"):
            weight_map = _read_index(path)
            shard_names = sorted(set(weight_map.values()))
            self._handles = {name: _safe_open(path.parent / name) for name in shard_names}
            self._where = {key: self._handles[name] for key, name in weight_map.items()}
        else:
            handle = _safe_open(path)
            self._handles = {path.name: handle}
            self._where = {key: handle for key in handle.keys()}
        self._shard_paths = [path.parent / n for n in self._handles] if path.name.endswith(".json") else [path]

    def keys(self) -> list[str]:
        return list(self._where)

    def meta(self, key: str) -> TensorMeta:
        sl = self._handle(key).get_slice(key)
        return TensorMeta(tuple(sl.get_shape()), SAFETENSORS_DTYPES[sl.get_dtype()])

    def read(self, key: str) -> torch.Tensor:
        return self._handle(key).get_tensor(key)

    def files(self) -> list[Path]:
        return list(self._shard_paths)

    def _handle(self, key: str):
        try:
            return self._where[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {key!r}") from None


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


def _safe_open(p: Path):
    if not p.exists():
        raise CheckpointError(f"shard not found: {p}")
    try:
        return safe_open(str(p), framework="pt")
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{p}: not a readable safetensors file ({e})") from e


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
        return source._handle(key).get_slice(key)[start:stop]
    return source.read(key)[start:stop]


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
