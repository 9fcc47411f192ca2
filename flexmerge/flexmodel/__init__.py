"""Materialize a point of the path (`materialize`), persist it (`artifact`), export it (`export`)."""

from flexmerge.flexmodel.artifact import load, save, write_artifact
from flexmerge.flexmodel.model import FlexModel

__all__ = ["FlexModel", "load", "save", "write_artifact"]
