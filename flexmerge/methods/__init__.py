"""Merging algorithms, one module each, registered by name."""

from flexmerge.methods import average, consensus, dare, emr, pcb, task_arithmetic, ties  # noqa: F401
from flexmerge.methods.base import (
    GroupResult,
    MergeMethod,
    available_methods,
    get_method,
    register,
)

__all__ = ["GroupResult", "MergeMethod", "available_methods", "get_method", "register"]
