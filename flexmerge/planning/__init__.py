"""Planning: from per-block similarity matrices to a merge path. Independent of materializing.

`build_path` runs the similarity pass and hands its results to a registered planner
(`flexmerge.planning.registry`, the planners in `flexmerge.planning.planners`); `PlanOptions`
holds how to plan, with its defaults."""

from __future__ import annotations

import time

from flexmerge.blocks import Partition
from flexmerge.device import resolve_device
from flexmerge.methods.base import MergeMethod
from flexmerge.planning import planners as _planners  # noqa: F401  (registers the planners)
from flexmerge.planning.activations import Calibration
from flexmerge.planning.greedy import LINKAGES
from flexmerge.planning.merged import MEASURES
from flexmerge.planning.options import COST_DEFAULTS, MODES, PlanOptions
from flexmerge.planning.path import SIZE_TOLERANCE, Assignment, MergePath, MergeStep
from flexmerge.planning.registry import PLANNERS, PlanInputs, check_plan_options, get_planner, register_planner
from flexmerge.preprocess import Pipeline, fitted_pipeline
from flexmerge.similarity import block_grams
from flexmerge.size import SizeModel
from flexmerge.taskvec import TaskSet

# Views of the registry by what a planner is (names, in registration order).
COST_PLANNERS = tuple(n for n, p in PLANNERS.items() if p.kind == "cost")
DATA_PLANNERS = tuple(n for n, p in PLANNERS.items() if p.data_aware)

__all__ = ["PLANNERS", "DATA_PLANNERS", "COST_PLANNERS", "MODES", "LINKAGES", "MEASURES", "COST_DEFAULTS",
           "Assignment", "MergePath", "MergeStep", "PlanOptions", "build_path", "check_plan_options", "get_planner",
           "register_planner"]


def build_path(tasks: TaskSet, partition: Partition, method: MergeMethod, options: PlanOptions | None = None, *,
               executor=None, device=None, calibration: Calibration | None = None,
               pipeline: Pipeline | None = None) -> MergePath:
    """Plan the whole path from M× to the method's smallest size, with exact sizes per point.

    `device` ("cpu", "auto", "cuda[:N]"): where preprocessing and the similarity pass compute.
    `calibration`: unlabelled inputs per task, needed by the data-aware planners (DATA_PLANNERS).
    `pipeline`: the method's preprocessing already fitted on `tasks` (`fitted_pipeline`), when the
    caller has it (a merge fits it once for planning and materializing)."""
    options = options or PlanOptions()
    check_plan_options(options, calibration)
    planner = get_planner(options.planner)
    device = resolve_device(device, executor)
    t0 = time.perf_counter()
    if pipeline is None:
        pipeline = fitted_pipeline(tasks, method, device)
    t1 = time.perf_counter()
    grams = block_grams(tasks, partition, pipeline, executor, device).numpy()
    t2 = time.perf_counter()
    sizer = SizeModel.build(partition, tasks, method)
    recorded = options.recorded(partition.granularity)
    if planner.kind == "cost":
        recorded.update(options.cost_settings())
    common = dict(planner=options.planner, options=recorded, method=method.describe(),
                  task_names=list(tasks.names), block_names=partition.names())
    result = planner.run(PlanInputs(tasks, partition, method, pipeline, grams, sizer, options, calibration))
    if planner.kind == "cluster":
        sizes = [sizer.size(a.group_sizes()) for a in result]
        path = MergePath(sizes=sizes, assignments=result, **common)
    else:
        steps, sizes = result
        path = MergePath(sizes=sizes, steps=steps, **common)
    path.timings = {"preprocess": t1 - t0, "similarity_pass": t2 - t1, "path": time.perf_counter() - t2}
    return path


def ends_in_whole_copies(method: MergeMethod, planner: str = "greedy") -> bool:
    """Whether `planner`'s paths end where every block is one group of all tasks, and every stored
    group costs one copy of its block (no masks, residuals or data-dependent storage): then the
    last point is the smallest size, and only it lies below the smallest block above it."""
    return get_planner(planner).kind == "order" and not (method.uses_masks or method.uses_residuals or method.data_dependent_size)


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
