"""Planning: from per-block similarity matrices to a merge path. Independent of materializing."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from flexmerge.blocks import Partition
from flexmerge.errors import ConfigError, UnknownNameError
from flexmerge.methods.base import MergeMethod
from flexmerge.planning.activations import DEFAULT_RANK, Calibration, task_metrics
from flexmerge.planning.baselines import channel_assignments, cluster_assignments
from flexmerge.planning.costs import (
    QuadraticCost,
    method_weights,
    output_quadratics,
    parameter_quadratics,
    run_cost_greedy,
)
from flexmerge.planning.greedy import (
    LINKAGES,
    ORDERS,
    ConstituentLinkage,
    Rescorer,
    run_greedy,
)
from flexmerge.planning.merged import MEASURES, GramMerged, VectorMerged
from flexmerge.planning.path import SIZE_TOLERANCE, Assignment, MergePath, MergeStep
from flexmerge.similarity import block_deltas, block_grams, cosine_from_gram
from flexmerge.size import SizeModel
from flexmerge.taskvec import TaskSet

COST_PLANNERS = ("output", "recon")
DATA_PLANNERS = ("output",)  # need unlabelled calibration inputs per task (`activations.Calibration`)
PLANNERS = (*ORDERS, "channel", "cluster", *COST_PLANNERS)
MODES = ("constituent", "merged")

__all__ = ["PLANNERS", "DATA_PLANNERS", "MODES", "LINKAGES", "MEASURES", "Assignment", "MergePath", "MergeStep", "build_path"]


def build_path(
    tasks: TaskSet,
    partition: Partition,
    method: MergeMethod,
    *,
    planner: str = "greedy",
    linkage: str = "min",
    mode: str = "constituent",
    measure: str = "cosine",
    seed: int = 0,
    executor=None,
    device=None,
    calibration: Calibration | None = None,
    cost_options: dict[str, Any] | None = None,
) -> MergePath:
    """Plan the whole path from M× to the method's smallest size, with exact sizes per point.

    `device` ("cpu", "auto", "cuda[:N]"): where preprocessing and the similarity pass compute.
    `calibration`: unlabelled inputs per task, needed by the data-aware planners (DATA_PLANNERS);
    `cost_options`: settings of the cost planners (`norm`, `byte_power`, `rank`, see `costs`)."""
    check_plan_options(planner, linkage, mode, measure, calibration)
    from flexmerge.device import resolve_device
    from flexmerge.preprocess import fitted_pipeline

    device = resolve_device(device, executor)
    t0 = time.perf_counter()
    pipeline = fitted_pipeline(tasks, method, device)
    t1 = time.perf_counter()
    grams = block_grams(tasks, partition, pipeline, executor, device).numpy()
    t2 = time.perf_counter()
    sizer = SizeModel.build(partition, tasks, method)
    options = path_options(partition, linkage, mode, measure, seed)
    common = dict(planner=planner, options=options, method=method.describe(),
                  task_names=list(tasks.names), block_names=partition.names())
    if planner in ORDERS:
        rescorer = _rescorer(tasks, partition, method, pipeline, grams, mode, measure, linkage)
        raw = run_greedy(rescorer, order=planner, seed=seed)
        steps, sizes = _sized_steps(raw, len(partition), tasks.num_tasks, sizer)
        path = MergePath(sizes=sizes, steps=steps, **common)
    elif planner in COST_PLANNERS:
        costs = dict(COST_DEFAULTS, **(cost_options or {}))
        options.update(costs)
        steps, sizes = _cost_path(tasks, partition, method, pipeline, grams, sizer, planner, calibration, costs)
        path = MergePath(sizes=sizes, steps=steps, **common)
    else:
        cos = cosine_from_gram(_as_torch(grams)).numpy()
        if planner == "channel":
            assignments = channel_assignments(cos, seed=seed)
        else:
            total = cosine_from_gram(_as_torch(grams.sum(0))).numpy()
            assignments = cluster_assignments(total, len(partition), linkage)
        sizes = [sizer.size(a.group_sizes()) for a in assignments]
        path = MergePath(sizes=sizes, assignments=assignments, **common)
    path.timings = {"preprocess": t1 - t0, "similarity_pass": t2 - t1, "path": time.perf_counter() - t2}
    return path


def check_plan_options(planner: str, linkage: str, mode: str, measure: str = "cosine",
                       calibration: Calibration | None = None) -> None:
    if measure not in MEASURES:
        raise UnknownNameError("merged-vector measure", measure, MEASURES)
    if planner not in PLANNERS:
        raise UnknownNameError("planner", planner, PLANNERS)
    if mode not in MODES:
        raise UnknownNameError("similarity mode", mode, MODES)
    if linkage not in LINKAGES:
        raise UnknownNameError("linkage", linkage, LINKAGES)
    if mode == "merged" and planner in ("channel", "cluster"):
        raise ConfigError(f"planner {planner!r} clusters task vectors; merged-vector mode applies to greedy orders")
    if planner in DATA_PLANNERS and calibration is None:
        raise ConfigError(f"planner {planner!r} is data-aware: it needs unlabelled calibration inputs per task "
                          "(a suite provides them: `flexmerge sweep --suite`); plan your own models with a "
                          "data-free planner (greedy, recon, ...)")


def path_options(partition: Partition, linkage: str = "min", mode: str = "constituent", measure: str = "cosine",
                 seed: int = 0) -> dict[str, Any]:
    """What a path records of how it was planned (its `options`)."""
    return {"linkage": linkage, "mode": mode, "measure": measure, "seed": seed, "granularity": partition.granularity}


def ends_in_whole_copies(method: MergeMethod, planner: str = "greedy") -> bool:
    """Whether `planner`'s paths end where every block is one group of all tasks, and every stored
    group costs one copy of its block (no masks, residuals or data-dependent storage): then the
    last point is the smallest size, and only it lies below the smallest block above it."""
    return planner in ORDERS and not (method.uses_masks or method.uses_residuals or method.data_dependent_size)


def cuts_at_last_point(tasks: TaskSet, partition: Partition, method: MergeMethod, size: float,
                       planner: str = "greedy") -> bool:
    """Whether cutting any path of `planner` at `size` gives its last point, so no plan is needed.

    A greedy order fuses one pair per step until every block is one group of all M tasks, in
    B·(M − 1) steps. When every stored group costs one copy of its block (no masks, residuals or
    data-dependent storage), every other point holds a block twice, so it is at least the
    smallest block above the last one: a `size` below that cuts at the last point whatever the
    similarities are, and planning (for TIES, a pass over the trimmed task vectors) is skipped."""
    if not ends_in_whole_copies(method, planner):
        return False
    if not len(partition) or tasks.num_tasks < 2:
        return False
    sizer = SizeModel.build(partition, tasks, method)
    last = last_point_size(sizer, tasks.num_tasks)
    step = sizer.unit.of(min(sizer.block_bytes))
    return last - SIZE_TOLERANCE <= size < last + step - SIZE_TOLERANCE


def last_point_size(sizer: SizeModel, num_tasks: int) -> float:
    """The size of the point where every block is one group of all tasks."""
    return sizer.size([[num_tasks]] * len(sizer.block_bytes))


def last_point(num_blocks: int, num_tasks: int) -> Assignment:
    """Every block one group of all tasks: where every greedy-order path ends."""
    return Assignment(tuple((tuple(range(num_tasks)),) for _ in range(num_blocks)))


COST_DEFAULTS: dict[str, Any] = {"norm": "block", "byte_power": 1.0, "rank": DEFAULT_RANK}


def _cost_path(tasks, partition, method, pipeline, grams, sizer: SizeModel, planner: str,
               calibration: Calibration | None, costs: dict[str, Any]) -> tuple[list[MergeStep], list[float]]:
    """The path of a cost planner: parameter-space (recon) or output-space (output) quadratics."""
    unknown = sorted(set(costs) - set(COST_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown cost planner options {unknown}; known: {sorted(COST_DEFAULTS)}")
    if planner == "recon":
        quad = parameter_quadratics(grams)
    else:
        quad = output_quadratics(tasks, partition, pipeline, task_metrics(tasks, calibration, int(costs["rank"])))
    cost = QuadraticCost(quad, method_weights(method), costs["norm"])

    def saved(b: int, groups: list[list[int]], i: int, j: int) -> float:
        sizes = [len(g) for g in groups if g]
        fused = [len(g) for k, g in enumerate(groups) if g and k not in (i, j)] + [len(groups[i]) + len(groups[j])]
        return sizer.unit.of(sizer.block_total(b, sizes) - sizer.block_total(b, fused))

    raw = run_cost_greedy(cost, saved, byte_power=float(costs["byte_power"]))
    return _sized_steps(raw, len(partition), tasks.num_tasks, sizer)


def _as_torch(a: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a))


def _rescorer(tasks, partition, method, pipeline, grams, mode, measure, linkage) -> Rescorer:
    if mode == "constituent":
        return ConstituentLinkage(cosine_from_gram(_as_torch(grams)).numpy(), linkage)
    if measure != "sign" and method.linear_weights(2) is not None:
        return GramMerged(grams, method, measure)
    vectors = [block_deltas(tasks, partition, b, pipeline) for b in range(len(partition))]
    return VectorMerged(vectors, method, measure, [blk.views(tasks.meta) for blk in partition.blocks])


def _sized_steps(raw, num_blocks: int, num_tasks: int, sizer: SizeModel) -> tuple[list[MergeStep], list[float]]:
    group_sizes = [[1] * num_tasks for _ in range(num_blocks)]
    block_bytes = [sizer.block_total(b, g) for b, g in enumerate(group_sizes)]
    total = sum(block_bytes) + sizer.specific_bytes
    sizes = [sizer.unit.of(total)]
    steps = []
    for b, left, right, sim in raw:
        g = group_sizes[b]
        g.remove(len(left))
        g.remove(len(right))
        g.append(len(left) + len(right))
        new = sizer.block_total(b, g)
        total += new - block_bytes[b]
        block_bytes[b] = new
        sizes.append(sizer.unit.of(total))
        steps.append(MergeStep(b, left, right, sim, sizes[-1]))
    return steps, sizes
