"""flexmerge: merge M fine-tuned models into one artifact of any size between 1x and Mx."""

from flexmerge.api import (
    artifact_summary,
    discover_blocks,
    load_tasks,
    materialize,
    merge,
    merge_files,
    merge_to_disk,
    plan,
)
from flexmerge.flexmodel import FlexModel, export, load, save
from flexmerge.methods import MethodSpec, available_methods, get_method
from flexmerge.peft_export import export_peft
from flexmerge.planning import MergePath, PlanOptions
from flexmerge.pleas import pleas
from flexmerge.version import __version__

__all__ = [
    "__version__", "load_tasks", "discover_blocks", "plan", "materialize", "merge", "merge_to_disk",
    "merge_files", "artifact_summary", "save", "load", "export", "export_peft", "FlexModel", "MergePath", "PlanOptions",
    "MethodSpec", "get_method", "available_methods", "pleas",
]
