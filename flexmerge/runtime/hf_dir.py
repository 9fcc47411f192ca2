"""A task's Hugging Face side files (config.json, tokenizer) written out as a folder, because
transformers' `from_pretrained` reads a directory, while artifacts and task sets hold them as bytes."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def unpack_hf_files(files: Mapping[str, bytes], parent: str | Path, task: str) -> Path:
    """Write `files` (name -> bytes) into a new folder `parent/task` and return it; the caller
    owns `parent` (a scratch directory removed with it)."""
    directory = Path(parent) / task
    directory.mkdir()
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory
