"""The one entry point for checkpoints in: what a path is decides which source reads it.

It sits above both source kinds, so that they need not know each other: the file sources
(`flexmerge.io.source`) know nothing of adapters, and an adapter (`flexmerge.io.adapters`) opens
its own weights as a plain file and gets its base model already opened from here.
"""

from __future__ import annotations

from pathlib import Path

from flexmerge.errors import CheckpointError
from flexmerge.io.adapters import AdapterSource, is_adapter_dir
from flexmerge.io.source import HF_WEIGHT_FILES, CheckpointSource, open_file


def open_checkpoint(path: str | Path, base: CheckpointSource | str | Path | None = None) -> CheckpointSource:
    """Open a safetensors file, sharded index, torch state dict or Hugging Face model directory, or
    a PEFT adapter directory as the fine-tune it makes of `base` (see `flexmerge.io.adapters`)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if is_adapter_dir(p):
        return _open_adapter(p, base)
    if p.is_dir():
        return _open_model_dir(p)
    return open_file(p, hf_dir=None)


def _open_adapter(p: Path, base: CheckpointSource | str | Path | None) -> AdapterSource:
    """An adapter stands for a fine-tune only against its base, opened here when given as a path."""
    if base is None:
        raise CheckpointError(f"{p} is a PEFT adapter: it can only be read against its base model")
    return AdapterSource(p, base if not isinstance(base, (str, Path)) else open_checkpoint(base))


def _open_model_dir(p: Path) -> CheckpointSource:
    """A Hugging Face model directory: the first of its weight files in `HF_WEIGHT_FILES` order."""
    for name in HF_WEIGHT_FILES:
        if (p / name).exists():
            return open_file(p / name, hf_dir=p)
    try:
        found = sorted(x.name for x in p.iterdir())[:10]
    except OSError as e:
        raise CheckpointError(f"{p}: cannot list the directory ({e.strerror or e})") from e
    raise CheckpointError(f"{p}: a directory must hold one of {', '.join(HF_WEIGHT_FILES)}; found {found}")
