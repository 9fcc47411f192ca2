"""Checkpoints in: every supported format behind one lazy `CheckpointSource` interface.

`open` dispatches a path to its source: `source` (safetensors, torch files, Hugging Face
directories) or `adapters` (PEFT adapters, read against their base); imports go one way,
source <- adapters <- open."""

from flexmerge.io.open import open_checkpoint
from flexmerge.io.source import CheckpointSource

__all__ = ["CheckpointSource", "open_checkpoint"]
