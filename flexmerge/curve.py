"""The accuracy-size curve: evaluate sizes along one path per (method, planner).

Each path is planned once; every requested size is a cut of it, materialized in memory and
evaluated task by task with a user-supplied evaluator `(task, state_dict) -> accuracy`.
Fine-tuned accuracies come from evaluating the input checkpoints themselves.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from flexmerge._progress import Progress
from flexmerge.api import discover_blocks
from flexmerge.device import resolve_device
from flexmerge.errors import ConfigError, SizeError
from flexmerge.flexmodel.materialize import materialize
from flexmerge.methods.base import MergeMethod, MethodSpec
from flexmerge.planning import PlanOptions, build_path
from flexmerge.planning.activations import Calibration
from flexmerge.planning.path import SIZE_TOLERANCE, Assignment
from flexmerge.runtime.routed import RoutedScore
from flexmerge.preprocess import Pipeline, fitted_pipeline
from flexmerge.size import point_size, stored_with_masks
from flexmerge.taskvec import TaskSet

Evaluator = Callable[[str, dict[str, torch.Tensor]], float]
AREA_SPAN = (1.0, 3.0)


def curve_area(points: Sequence[tuple[float, float]], lo: float = AREA_SPAN[0], hi: float = AREA_SPAN[1]) -> float | None:
    """Mean height of the piecewise-linear curve through (exact size, value) points over [lo, hi]:
    the trapezoid area between lo and hi divided by hi - lo (so a flat curve at 0.9 scores 0.9).

    Points are sorted by size (equal sizes averaged). The value at a bound is linear interpolation
    between the nearest points on either side; a point exactly at a bound is that value; points
    outside [lo, hi] enter only through that interpolation. Past the largest point the curve stays
    flat up to hi (a budget of hi deploys the largest point at or below it). None when no point is
    at or below lo (nothing is deployable at lo, so the area is undefined)."""
    if not lo < hi:
        raise ValueError(f"area bounds must satisfy lo < hi, got [{lo}, {hi}]")
    by_size: dict[float, list[float]] = {}
    for size, value in points:
        by_size.setdefault(float(size), []).append(float(value))
    xs = sorted(by_size)
    if not xs or xs[0] > lo + SIZE_TOLERANCE:
        return None
    ys = [sum(by_size[x]) / len(by_size[x]) for x in xs]
    inner = [(lo, float(np.interp(lo, xs, ys)))] + [(x, y) for x, y in zip(xs, ys) if lo < x < hi]
    inner.append((hi, float(np.interp(hi, xs, ys))))  # np.interp is flat past the largest point
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(inner, inner[1:]))
    return area / (hi - lo)


@dataclass
class SweepRecord:
    """One task's accuracy at one point of one curve (accuracy None: size below the method's minimum)."""

    method: str
    planner: str
    requested_size: float
    size: float | None
    task: str
    accuracy: float | None
    finetuned: float
    normalized: float | None
    note: str = ""
    routed: bool = False  # evaluated without task ids (`sweep(routed=...)`): its curve is '<method> routed'
    router_accuracy: float | None = None  # routed: the fraction of the task's test inputs routed to it

    @property
    def curve(self) -> str:
        name = self.method if self.planner == "greedy" else f"{self.method}/{self.planner}"
        return f"{name} routed" if self.routed else name


@dataclass
class SweepResult:
    records: list[SweepRecord]
    finetuned: dict[str, float]
    base: dict[str, float] | None = None  # base encoder + trained head, when the caller knows it
    timings: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def curves(self) -> dict[str, list[dict[str, float]]]:
        """Per curve, per evaluated size: mean normalized and mean absolute accuracy over tasks (the
        normalized mean over the tasks whose fine-tune scores above 0: merged / 0 is no ratio)."""
        out: dict[str, list[dict[str, float]]] = {}
        keys = sorted({(r.curve, r.requested_size) for r in self.records}, key=lambda k: (k[0], k[1]))
        for curve, req in keys:
            rows = [r for r in self.records if r.curve == curve and r.requested_size == req and r.accuracy is not None]
            if not rows:
                continue
            ratios = [r.normalized for r in rows if r.normalized is not None]
            point = {"requested_size": req, "size": rows[0].size,
                     "normalized": sum(ratios) / len(ratios),
                     "accuracy": sum(r.accuracy for r in rows) / len(rows)}
            if rows[0].routed:  # mean over tasks, as the accuracies
                point["router_accuracy"] = sum(r.router_accuracy for r in rows) / len(rows)
            out.setdefault(curve, []).append(point)
        return out

    def areas(self, lo: float = AREA_SPAN[0], hi: float = AREA_SPAN[1]) -> dict[str, float | None]:
        """Per curve, `curve_area` of its mean normalized accuracy over exact sizes [lo, hi]."""
        return {curve: curve_area([(p["size"], p["normalized"]) for p in points], lo, hi)
                for curve, points in self.curves().items()}

    def to_dict(self) -> dict[str, Any]:
        return {"records": [asdict(r) for r in self.records], "finetuned": self.finetuned, "base": self.base,
                "curves": self.curves(), "areas": {"span": list(AREA_SPAN), "normalized": self.areas()},
                "timings_s": self.timings, "meta": self.meta}


def is_unmerged(assignment: Assignment) -> bool:
    """Every block keeps one group per task: the Mx point."""
    return all(len(g) == 1 for block in assignment.groups for g in block)


def spec_method(spec: str, params: dict[str, dict[str, Any]] | None = None):
    """The method a sweep entry names: 'twin:rank=4' is twin with rank 4, its curve labelled by the
    whole spec; `params[spec]` (or `params[name]`) adds parameters to it."""
    parsed = MethodSpec.parse(spec)
    return parsed.with_params((params or {}).get(spec, (params or {}).get(parsed.name, {}))).build()


def sweep(
    tasks: TaskSet,
    evaluator: Evaluator,
    *,
    methods: Sequence[str],
    sizes: Sequence[float],
    planners: Sequence[str] = ("greedy",),
    params: dict[str, dict[str, Any]] | None = None,
    granularity: str = "sublayer",
    options: PlanOptions | None = None,
    base_accuracy: dict[str, float] | None = None,
    routed: Callable[[Any], RoutedScore] | None = None,
    log: Callable[[str], None] = lambda s: None,
    device: str | None = None,
    calibration: Calibration | None = None,
    **option_fields: Any,
) -> SweepResult:
    """Evaluate every (method, planner) at every size; sizes below a method's minimum are noted,
    sizes above the unmerged models' (M, plus the tasks' own parameters) are dropped.

    The Mx point is the fine-tuned models (every block one group per task, stored as copies, equal
    bit for bit), so its records reuse the fine-tuned evaluation instead of running it again.

    A method is a name or a spec with parameters, `twin:rank=4:base=ties` (see `MethodSpec`),
    so one sweep holds a method at several settings, each its own curve. `device`: where planning
    and merging compute (see `flexmerge.device`); evaluation is the evaluator's business.
    How to plan: `options` (a `PlanOptions`) and/or its fields by name (`linkage`, `seed`, `cost`,
    ...), the planner taken from each of `planners` in turn. `calibration` (unlabelled inputs per
    task) is what the data-aware planners read.

    `routed` (e.g. `flexmerge.suites.routing.SuiteRouting`): called with each twin point's model, it returns
    a `RoutedScore`, recorded as the curve '<spec> routed' (accuracy without task ids, and the
    router's accuracy); the Mx point, the fine-tuned models, is not routed."""
    timings: dict[str, float] = {"plan": 0.0, "materialize": 0.0, "evaluate": 0.0}
    sizes = [s for s in sizes if s <= tasks.num_tasks + SIZE_TOLERANCE]
    given = PlanOptions.of(options, **option_fields)  # each planner of `planners` in turn replaces its planner
    with Progress("sweep", 1 + len(planners) * len(methods) * len(sizes), "points") as bar:
        t0 = time.perf_counter()
        bar.update(0, now="the fine-tuned models")
        finetuned = {t: evaluator(t, tasks.finetuned_state_dict(i)) for i, t in enumerate(tasks.names)}
        if not any(finetuned.values()):
            raise ConfigError("every fine-tuned model scores 0 on its own task, so no merge can be normalized by "
                              f"its fine-tune's score ({', '.join(f'{t} {v:g}' for t, v in finetuned.items())}); "
                              "check the evaluator and its data")
        bar.update()
        timings["evaluate"] += time.perf_counter() - t0
        partition = discover_blocks(tasks, granularity)
        records: list[SweepRecord] = []
        scores_of: dict[str, WeightsScores] = {}  # per method spec, whatever the planner
        pipelines: dict[str, Pipeline] = {}  # per method spec: its preprocessing, fitted once
        for planner in planners:
            planning = PlanOptions.of(given, planner=planner)
            for name in methods:
                method = spec_method(name, params).for_tasks(tasks.names)
                scores = scores_of.setdefault(name, WeightsScores(method, finetuned))
                t0 = time.perf_counter()
                bar.update(0, now=f"planning {name}/{planner}")
                if name not in pipelines:
                    pipelines[name] = fitted_pipeline(tasks, method, resolve_device(device))
                path = build_path(tasks, partition, method, planning, device=device, calibration=calibration,
                                  pipeline=pipelines[name])
                timings["plan"] += time.perf_counter() - t0
                log(f"{name}/{planner}: path of {path.num_points} points, {path.sizes[0]:.2f}x -> {path.min_size:.3f}x")
                for size in sizes:
                    bar.update(0, now=f"{name}/{planner} at {size:g}x")
                    records += _point_records(tasks, partition, path, method, pipelines[name], name, planner, size,
                                              evaluator, scores, finetuned, routed, timings, device)
                    bar.update()
    meta = {"methods": list(methods), "planners": list(planners), "sizes": list(sizes), "tasks": list(tasks.names),
            "granularity": granularity, "linkage": given.linkage, "seed": given.seed}
    return SweepResult(records, finetuned, base_accuracy, timings, meta)


class WeightsScores:
    """The scores of one method's weights, keyed by what decides them: for each block, the group a
    task reads (a group's merge depends on its members only; a mask method stores the members of
    a group too small for masks as their own copies). A task whose groups at one size are the ones
    it had at another, or that reads its own copy in every block (its fine-tune, where the method
    stores the inputs' dtype), is scored once."""

    def __init__(self, method: MergeMethod, finetuned: dict[str, float]):
        self.method, self.finetuned = method, finetuned
        self.seen: dict[tuple, float] = {}

    def key(self, assignment: Assignment, task: int) -> tuple:
        own = (task,)
        groups = (next(g for g in block if task in g) for block in assignment.groups)
        if self.method.uses_masks:
            return tuple(g if stored_with_masks(self.method, len(g)) else own for g in groups)
        return tuple(groups)

    def known(self, assignment: Assignment, task: int, name: str) -> float | None:
        key = self.key(assignment, task)
        if all(len(g) == 1 for g in key) and self.method.p.dtype is None:
            return self.finetuned[name]
        return self.seen.get(key)

    def add(self, assignment: Assignment, task: int, score: float) -> None:
        self.seen[self.key(assignment, task)] = score


def _point_records(tasks: TaskSet, partition, path, method, pipeline, name: str, planner: str, size: float, evaluator,
                   scores: WeightsScores, finetuned: dict[str, float], routed, timings: dict[str, float],
                   device) -> list[SweepRecord]:
    """The records of one (method, planner, size) point: each task scored on the weights it reads
    there (once per distinct weights), or a note when the size is below the method's minimum."""
    try:
        assignment = path.cut(size)  # as `flexmerge merge --size`: heads count
    except SizeError:
        note = f"below the minimum size {path.min_size:.4f}x"
        return [SweepRecord(name, planner, size, None, t, None, finetuned[t], None, note) for t in tasks.names]
    if is_unmerged(assignment):  # Mx: the fine-tuned models themselves, already evaluated
        mx = point_size(tasks, partition, method, assignment.group_sizes())
        return [SweepRecord(name, planner, size, mx, t, finetuned[t], finetuned[t], 1.0 if finetuned[t] else None,
                            "Mx: the fine-tuned models") for t in tasks.names]
    known = {t: scores.known(assignment, i, t) for i, t in enumerate(tasks.names)}
    twin_routed = routed is not None and MethodSpec.parse(name).name == "twin"  # `--routed` scores twin points
    needs_model = None in known.values() or method.data_dependent_size or twin_routed
    t1 = time.perf_counter()
    flex = materialize(tasks, partition, assignment, method, device=device, pipeline=pipeline) if needs_model else None
    actual = flex.size if flex is not None else point_size(tasks, partition, method, assignment.group_sizes())
    t2 = time.perf_counter()
    records = []
    for i, t in enumerate(tasks.names):
        acc = known[t]
        if acc is None:
            acc = evaluator(t, flex.state_dict(t))
            scores.add(assignment, i, acc)
        records.append(SweepRecord(name, planner, size, actual, t, acc, finetuned[t],
                                   acc / finetuned[t] if finetuned[t] else None))
    timings["materialize"] += t2 - t1
    timings["evaluate"] += time.perf_counter() - t2
    if twin_routed:
        t3 = time.perf_counter()
        records += _routed_records(routed(flex), name, planner, size, flex.size, finetuned)
        timings["routed"] = timings.get("routed", 0.0) + time.perf_counter() - t3
    return records


def _routed_records(score: RoutedScore, name: str, planner: str, size: float, actual: float,
                    finetuned: dict[str, float]) -> list[SweepRecord]:
    """A routed point's records, one per task: its accuracy without task ids, normalized as the others."""
    return [SweepRecord(name, planner, size, actual, t, acc, finetuned[t], acc / finetuned[t] if finetuned[t] else None,
                        f"routed ({score.router_overall:.3f} of all inputs to their task)", routed=True,
                        router_accuracy=score.router_accuracy[t])
            for t, acc in score.accuracy.items()]
