"""Export one task's full weights as a plain checkpoint (safetensors file or HF directory)."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from flexmerge._atomic import atomic_directory, write_bytes_atomic
from flexmerge.flexmodel.artifact import _unshare
from flexmerge.flexmodel.model import FlexModel


def export(flex: FlexModel, task: str, out: str | Path, overwrite: bool = False) -> Path:
    """`out` ending in .safetensors: one file. Otherwise a directory with model.safetensors and,
    when the inputs were Hugging Face directories, their config and tokenizer files."""
    out = Path(out)
    state = {k: v.contiguous() for k, v in _unshare(flex.state_dict(task)).items()}
    metadata = {"format": "pt", "flexmerge_task": task, "flexmerge_size": f"{flex.size:.6f}"}
    if out.suffix == ".safetensors":
        from safetensors.torch import save

        write_bytes_atomic(out, save(state, metadata=metadata), overwrite=overwrite)
        return out
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata=metadata)
        for name, data in flex.hf_files.get(task, {}).items():
            (tmp / name).write_bytes(data)
    return out
