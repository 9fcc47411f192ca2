"""Materialize a point of the path, persist it, and serve it per task."""

from flexmerge.flexmodel.artifact import load, save, write_artifact
from flexmerge.flexmodel.materialize import materialize, materialize_blocks
from flexmerge.flexmodel.model import FlexModel

__all__ = ["FlexModel", "load", "materialize", "materialize_blocks", "save", "write_artifact"]
