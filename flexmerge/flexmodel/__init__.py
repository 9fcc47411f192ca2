"""Materialize a point of the path (`materialize`), persist it (`artifact`), export it (`export`).

Imports go one way: model <- artifact <- export (the FlexModel knows nothing of files)."""

from flexmerge.flexmodel.artifact import load, save, write_artifact
from flexmerge.flexmodel.export import export
from flexmerge.flexmodel.model import FlexModel

__all__ = ["FlexModel", "export", "load", "save", "write_artifact"]
