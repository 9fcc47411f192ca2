"""Export one task's full weights as a plain checkpoint (safetensors file or HF directory)."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save

from flexmerge._atomic import atomic_directory, write_bytes_atomic
from flexmerge.flexmodel.artifact import _side_file_name, _unshare, write_safetensors
from flexmerge.io.source import HF_SIDE_FILES
from flexmerge.flexmodel.model import FlexModel

EXPORT_MARK = "flexmerge_task"  # safetensors metadata key of every export: what --overwrite may replace


def export(flex: FlexModel, task: str, out: str | Path, overwrite: bool = False) -> Path:
    """`out` ending in .safetensors: one file. Otherwise a directory with model.safetensors and,
    when the inputs were Hugging Face directories, their config and tokenizer files.

    `overwrite` replaces only an earlier flexmerge export, never another file or directory."""
    out = Path(out)
    state = {k: v.contiguous() for k, v in _unshare(flex.state_dict(task)).items()}
    metadata = {"format": "pt", EXPORT_MARK: task, "flexmerge_size": f"{flex.size:.6f}"}
    if out.suffix == ".safetensors":
        write_bytes_atomic(out, save(state, metadata=metadata), overwrite=overwrite,
                           replaceable=is_export_file, what="a flexmerge export")
        return out
    with atomic_directory(out, overwrite=overwrite, replaceable=is_export_dir, what="a flexmerge export") as tmp:
        write_safetensors(state, tmp / "model.safetensors", metadata=metadata)
        for name, data in flex.hf_files.get(task, {}).items():
            (tmp / _side_file_name(name)).write_bytes(data)
    return out


def is_export_file(path: Path) -> bool:
    """A regular safetensors file that a flexmerge export wrote (its metadata says so)."""
    if not path.is_file() or path.is_symlink():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return EXPORT_MARK in (f.metadata() or {})
    except Exception:  # any unreadable file is simply not an export
        return False


def is_export_dir(path: Path) -> bool:
    """A directory that a flexmerge export wrote and that holds nothing else (no files of the user's)."""
    return (path.is_dir() and not path.is_symlink() and is_export_file(path / "model.safetensors")
            and all(f.name == "model.safetensors" or f.name in HF_SIDE_FILES for f in path.iterdir()))
