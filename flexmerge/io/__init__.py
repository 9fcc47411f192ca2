"""Checkpoints in: every supported format behind one lazy `CheckpointSource` interface."""

from flexmerge.io.source import CheckpointSource, open_checkpoint

__all__ = ["CheckpointSource", "open_checkpoint"]
