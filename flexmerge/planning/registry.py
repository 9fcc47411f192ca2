"""Planners by name, registered as the merging methods are (`flexmerge.methods.base.register`).

A planner turns the similarity pass's results (`PlanInputs`) into the steps or assignments of a
merge path. Its `kind` says what the rest of the library may assume about its paths:
"order" (a greedy order: fuses one pair per step until every block is one group of all tasks),
"cluster" (one assignment per k = M .. 1, from cosine matrices), "cost" (a greedy order over
quadratic costs, `flexmerge.planning.costs`). `data_aware` planners read calibration inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from flexmerge.errors import UnknownNameError

if TYPE_CHECKING:
    from flexmerge.blocks import Partition
    from flexmerge.methods.base import MergeMethod
    from flexmerge.planning.activations import Calibration
    from flexmerge.planning.options import PlanOptions
    from flexmerge.planning.path import Assignment, MergeStep
    from flexmerge.preprocess import Pipeline
    from flexmerge.size import SizeModel
    from flexmerge.taskvec import TaskSet

Kind = Literal["order", "cluster", "cost"]


@dataclass
class PlanInputs:
    """What every planner may read: the inputs, the method's fitted preprocessing, the (B, M, M)
    Gram matrices of the (preprocessed) task vectors per block, and the exact size of any point."""

    tasks: TaskSet
    partition: Partition
    method: MergeMethod
    pipeline: Pipeline
    grams: np.ndarray
    sizer: SizeModel
    options: PlanOptions
    calibration: Calibration | None = None


# Steps and their sizes (an order), or one assignment per point (a clustering).
PlanResult = tuple[list["MergeStep"], list[float]] | list["Assignment"]


@dataclass(frozen=True)
class Planner:
    name: str
    kind: Kind
    run: Callable[[PlanInputs], Any]
    data_aware: bool = False
    summary: str = ""


PLANNERS: dict[str, Planner] = {}


def register_planner(name: str, kind: Kind, *, data_aware: bool = False, summary: str = ""):
    """Decorator: `run(inputs: PlanInputs)` becomes the planner `name`."""

    def wrap(run: Callable[[PlanInputs], Any]) -> Callable[[PlanInputs], Any]:
        if name in PLANNERS:
            raise ValueError(f"planner {name!r} is registered twice")
        PLANNERS[name] = Planner(name, kind, run, data_aware, summary)
        return run

    return wrap


def get_planner(name: str) -> Planner:
    if name not in PLANNERS:
        raise UnknownNameError("planner", name, tuple(PLANNERS))
    return PLANNERS[name]
