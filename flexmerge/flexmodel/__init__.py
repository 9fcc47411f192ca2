"""Materialize a point of the path (`materialize`), persist it (`write`), load it (`read`), export it (`export`).

Imports go one way: model <- format <- read <- write <- export (the FlexModel knows nothing of
files; `format` holds the names and fields the writer and the reader share)."""

from flexmerge.flexmodel.export import export
from flexmerge.flexmodel.model import FlexModel
from flexmerge.flexmodel.read import load
from flexmerge.flexmodel.write import save, write_artifact

__all__ = ["FlexModel", "export", "load", "save", "write_artifact"]
