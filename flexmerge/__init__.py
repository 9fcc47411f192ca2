"""flexmerge: merge M fine-tuned models into one artifact of any size between 1x and Mx."""

__version__ = "0.1.0"

from flexmerge.api import (  # noqa: E402
    discover_blocks,
    load_tasks,
    materialize,
    merge,
    merge_to_disk,
    plan,
)
from flexmerge.flexmodel import FlexModel, export, load, save  # noqa: E402
from flexmerge.methods import available_methods, get_method  # noqa: E402
from flexmerge.planning import MergePath  # noqa: E402
from flexmerge.pleas import pleas  # noqa: E402

__all__ = [
    "__version__", "load_tasks", "discover_blocks", "plan", "materialize", "merge", "merge_to_disk",
    "save", "load", "export", "FlexModel", "MergePath", "get_method", "available_methods",
    "pleas",
]
