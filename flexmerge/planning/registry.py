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
from typing import TYPE_CHECKING, Literal, Union

import numpy as np

from flexmerge.errors import ConfigError, UnknownNameError
from flexmerge.planning.greedy import LINKAGES
from flexmerge.planning.merged import MEASURES
from flexmerge.planning.options import COST_DEFAULTS, MODES, PlanOptions
from flexmerge.planning.path import Assignment, MergeStep

if TYPE_CHECKING:
    from flexmerge.blocks import Partition
    from flexmerge.methods.base import MergeMethod
    from flexmerge.planning.activations import Calibration
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
PlanResult = Union[tuple[list[MergeStep], list[float]], list[Assignment]]


@dataclass(frozen=True)
class Planner:
    name: str
    kind: Kind
    run: Callable[[PlanInputs], PlanResult]
    data_aware: bool = False
    summary: str = ""


PLANNERS: dict[str, Planner] = {}


def register_planner(name: str, kind: Kind, *, data_aware: bool = False, summary: str = ""):
    """Decorator: `run(inputs: PlanInputs)` becomes the planner `name`."""

    def wrap(run: Callable[[PlanInputs], PlanResult]) -> Callable[[PlanInputs], PlanResult]:
        if name in PLANNERS:
            raise ValueError(f"planner {name!r} is registered twice")
        PLANNERS[name] = Planner(name, kind, run, data_aware, summary)
        return run

    return wrap


def get_planner(name: str) -> Planner:
    if name not in PLANNERS:
        raise UnknownNameError("planner", name, tuple(PLANNERS))
    return PLANNERS[name]


def check_plan_options(options: PlanOptions, calibration: object | None = None) -> None:
    """Refuse unknown names and combinations that mean nothing, before any pass over the inputs."""
    if options.measure not in MEASURES:
        raise UnknownNameError("merged-vector measure", options.measure, MEASURES)
    planner = get_planner(options.planner)
    if options.mode not in MODES:
        raise UnknownNameError("similarity mode", options.mode, MODES)
    if options.linkage not in LINKAGES:
        raise UnknownNameError("linkage", options.linkage, LINKAGES)
    if options.mode == "merged" and planner.kind == "cluster":
        raise ConfigError(f"planner {options.planner!r} clusters task vectors; merged-vector mode applies to greedy "
                          "orders")
    if planner.data_aware and calibration is None:
        raise ConfigError(f"planner {options.planner!r} is data-aware: it needs unlabelled calibration inputs per "
                          "task (a suite provides them: `flexmerge sweep --suite`); plan your own models with a "
                          "data-free planner (greedy, recon, ...)")
    unknown = sorted(set(options.cost) - set(COST_DEFAULTS))
    if unknown and planner.kind == "cost":
        raise ConfigError(f"unknown cost planner options {unknown}; known: {sorted(COST_DEFAULTS)}")
