"""The public verbs, in data-flow order: load -> blocks -> plan -> materialize -> save/load."""

from __future__ import annotations

import math
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flexmerge import blocks as _blocks
from flexmerge.blocks import Partition
from flexmerge._atomic import check_target
from flexmerge.device import resolve_device
from flexmerge.flexmodel.card import input_names
from flexmerge.flexmodel.format import ArtifactHeader
from flexmerge.flexmodel.materialize import AllTasksMerge, collect_hf_files, materialize_blocks
from flexmerge.flexmodel.materialize import materialize as _materialize
from flexmerge.flexmodel.model import FlexModel
from flexmerge.flexmodel.read import is_artifact, read_manifest
from flexmerge.flexmodel.write import SHARD_BYTES, write_artifact
from flexmerge.methods.base import MergeMethod, get_method
from flexmerge.planning import (
    MergePath,
    PlanOptions,
    build_path,
    check_plan_options,
    cuts_at_last_point,
    ends_in_whole_copies,
    last_point,
    last_point_size,
)
from flexmerge.planning.activations import Calibration
from flexmerge.preprocess import MagnitudeHistogram, Pipeline, TopKTrim, fitted_pipeline
from flexmerge.errors import ConfigError, SizeError
from flexmerge.planning.path import SIZE_TOLERANCE, Assignment
from flexmerge.size import ModelUnit, SizeModel, format_bytes, model_unit, point_size
from flexmerge.taskvec import TaskSet, load_tasks, parse_task_specs

__all__ = ["load_tasks", "load_for_merge", "first_pass_for", "discover_blocks", "plan", "materialize", "merge",
           "merge_to_disk", "merge_files", "artifact_summary", "cut", "size_for_budget"]

PLAN_FIELDS = frozenset(f.name for f in dataclasses.fields(PlanOptions))


def discover_blocks(tasks: TaskSet, granularity: str = "sublayer", patterns: Mapping[str, str] | None = None) -> Partition:
    """Partition the mergeable parameters of `tasks` into blocks (see `flexmerge.blocks`)."""
    return _blocks.discover_blocks(tasks.mergeable, tasks.meta, granularity, patterns)


def _method(method: str | MergeMethod, params: Mapping[str, Any] | None) -> MergeMethod:
    if isinstance(method, MergeMethod):
        return method
    return get_method(method, params)


def _method_for(tasks: TaskSet, method: str | MergeMethod, params: Mapping[str, Any] | None) -> MergeMethod:
    """The configured method for a merge of `tasks`: checked against them, their weights bound."""
    return _method(method, params).for_tasks(tasks.names)


# What the validation pass may keep of a 1x merge (AllTasksMerge): at 1 GiB a 0.5B-parameter fp16
# model (the vs_mergekit --large job, 963 MB) merges in one read, 15.9 s and 1.25 GiB peak against
# 22.8 s and 0.81 GiB reading twice; a larger model is read twice, one block in memory at a time.
ALL_TASKS_MERGE_BYTES = 1 << 30


def first_pass_for(method: str | MergeMethod, params: Mapping[str, Any] | None = None,
                   budget_bytes: int = ALL_TASKS_MERGE_BYTES, merging: bool = True,
                   names: Sequence[str] | None = None) -> list:
    """The `load_tasks(observers=...)` that let a merge with `method` read the inputs once less:
    its merge of all tasks (a linear or other elementwise method without preprocessing, when one
    copy of the weights fits `budget_bytes`; only when `merging`, a plan alone has no use for
    it; with per-task weights, only when the task `names` are given), or the first pass of its
    global trim (TIES and others that trim each task vector over the whole model)."""
    m = _method(method, params)
    if AllTasksMerge.applies(m):
        if not merging or (names is None and getattr(m.p, "weights", None) is not None):
            return []
        everyone = m if names is None else m.for_tasks(names).for_group(range(len(names)))
        return [AllTasksMerge(everyone, budget_bytes)]
    first = m.pipeline().transforms[:1]
    if first and isinstance(first[0], TopKTrim) and first[0].scope == "model":
        return [MagnitudeHistogram()]
    return []


def uses_key_grams(method: str | MergeMethod, params: Mapping[str, Any] | None = None, size: float | None = None,
                   max_bytes: int | None = None, planner: str = "greedy") -> bool:
    """Whether a merge with `method` may plan on the raw task vectors' Gram matrices, which
    `load_tasks(key_grams=True)` accumulates in the validation pass (an (M, M) product per chunk,
    a tenth of a 1x merge's time). Not when the method preprocesses (its similarity pass is over
    the trimmed vectors), nor when a `size` of 1x needs no plan (`ends_in_whole_copies`: such a
    size cuts at the last point, as `cuts_at_last_point` finds once the tasks are loaded, or is
    below the smallest). A plan made without them runs its own pass, so False is only slower."""
    m = _method(method, params)
    if m.pipeline().transforms:
        return False
    smallest = size == "min" or (isinstance(size, (int, float)) and size <= 1 + SIZE_TOLERANCE)
    return not (smallest and max_bytes is None and ends_in_whole_copies(m, planner))


def plan(
    tasks: TaskSet,
    partition: Partition | None = None,
    *,
    method: str | MergeMethod = "task_arithmetic",
    params: Mapping[str, Any] | None = None,
    granularity: str = "sublayer",
    patterns: Mapping[str, str] | None = None,
    options: PlanOptions | None = None,
    executor=None,
    device: str | None = None,
    calibration: Calibration | None = None,
    pipeline: Pipeline | None = None,
    **option_fields: Any,
) -> MergePath:
    """The merge path from M× to the method's smallest size; cut it with `path.cut(size)`.

    How to plan: `options` (a `PlanOptions`) and/or its fields by name (`planner="recon"`,
    `linkage`, `mode`, `measure`, `seed`, `cost`). `device`: "cpu" (default), "auto" (CUDA when
    available) or "cuda[:N]", where preprocessing and the similarity pass compute
    (docs/scale.md, "Devices"). `calibration`: unlabelled inputs per task for the data-aware
    planners (`planner="output"`); `pipeline`: the method's preprocessing fitted already."""
    partition = partition or discover_blocks(tasks, granularity, patterns)
    return build_path(tasks, partition, _method_for(tasks, method, params), PlanOptions.of(options, **option_fields),
                      executor=executor, device=device, calibration=calibration, pipeline=pipeline)


def materialize(
    tasks: TaskSet, path: MergePath, size: float | str, *, partition: Partition | None = None,
    method: str | MergeMethod | None = None, params: Mapping[str, Any] | None = None,
    device: str | None = None,
) -> FlexModel:
    """The flex model at `size` along `path`, with the method the path was planned for, merged on
    `device` (as `plan`'s).

    `size`: model units (one whole fine-tune each, its own parameters included), or "max" (every
    fine-tune as it is) or "min" (the path's smallest point)."""
    m = _method_for(tasks, method or path.method["name"], params if method else _path_params(path))
    size = resolve_size(size, path)
    partition = partition or discover_blocks(tasks, path.options["granularity"])
    _check_same_blocks(partition, path)
    device = resolve_device(device)
    return _materialize(tasks, partition, cut(tasks, path, size), m, info=_info(path, size, tasks, device),
                        device=device)


def merge(tasks: TaskSet, *, size: float | str | None = None, max_bytes: int | None = None,
          method: str | MergeMethod = "task_arithmetic", params: Mapping[str, Any] | None = None,
          device: str | None = None, granularity: str = "sublayer", patterns: Mapping[str, str] | None = None,
          options: PlanOptions | None = None, executor=None, calibration: Calibration | None = None,
          tokenizer_source: str | None = None, chat_template: str | None = None, **option_fields: Any) -> FlexModel:
    """Plan and materialize in one call: the flex model of `tasks` at `size` (or within `max_bytes`),
    planned (`options` and/or its fields, as `plan`'s) and merged on `device`. `tokenizer_source`
    ("tasks": each its own; "base": the base's, with tasks loaded over the base's vocabulary when a
    fine-tune added tokens; default: the vocabulary `tasks` were loaded over) and `chat_template`:
    what the exports carry."""
    device = resolve_device(device, executor)
    m = _method_for(tasks, method, params)
    partition = discover_blocks(tasks, granularity, patterns)
    pipeline = fitted_pipeline(tasks, m, device)
    size, assignment, info = _plan_and_cut(tasks, partition, m, size, max_bytes, PlanOptions.of(options, **option_fields),
                                           pipeline, device=device, executor=executor, calibration=calibration)
    return _materialize(tasks, partition, assignment, m, info=info, device=device, pipeline=pipeline,
                        tokenizer_source=tokenizer_source, chat_template=chat_template)


def _plan_and_cut(tasks: TaskSet, partition: Partition, m: MergeMethod, size: float | str | None,
                  max_bytes: int | None, options: PlanOptions, pipeline: Pipeline, *, device, executor=None,
                  calibration: Calibration | None = None) -> tuple[float, Assignment, dict[str, Any]]:
    """The size, the assignment to materialize there and the artifact's info. A size that can only
    cut at the path's last point (every block one group of all tasks) needs no plan, and none is
    made: the artifact and its info are those the planned path would give (a test compares them)."""
    if size == "max":
        size = float(tasks.num_tasks)
    if size == "min" and max_bytes is None and ends_in_whole_copies(m, options.planner):  # the last point, no plan
        size = last_point_size(SizeModel.build(partition, tasks, m), tasks.num_tasks)
    if (isinstance(size, (int, float)) and max_bytes is None
            and cuts_at_last_point(tasks, partition, m, size, options.planner)):
        check_plan_options(options, calibration)
        steps = len(partition) * (tasks.num_tasks - 1)
        info = _point_info(options.planner, options.recorded(partition.granularity), steps, steps + 1, size, tasks,
                           device)
        return size, last_point(len(partition), tasks.num_tasks), info
    path = build_path(tasks, partition, m, options, executor=executor, device=device, calibration=calibration,
                      pipeline=pipeline)
    size = _target(tasks, path, resolve_size(size, path), max_bytes)
    return size, cut(tasks, path, size), _info(path, size, tasks, device)


def cut(tasks: TaskSet, path: MergePath, size: float | str) -> Assignment:
    """The path's largest point whose size, the tasks' own parameters included, is at most `size`."""
    return path.cut(resolve_size(size, path))


def resolve_size(size: float | str | None, path: MergePath) -> float | None:
    """A size in model units; "max": every fine-tune as it is (M), "min": the path's smallest point."""
    if size == "max":
        return path.sizes[0]
    if size == "min":
        return path.min_size
    if isinstance(size, str):
        raise ConfigError(f"size {size!r}: give a number of model units, 'max' or 'min'")
    return size


def size_for_budget(tasks: TaskSet, path: MergePath, max_bytes: int) -> float:
    """The size that `max_bytes` of storage buys: everything stored counts (frozen parameters once,
    the tasks' own parameters, masks and θ0 copies); an impossible budget names the smallest one."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ConfigError(f"max_bytes must be a positive number of bytes, got {max_bytes!r}")
    unit = path_unit(tasks, path)
    fixed = tasks.frozen_bytes() + tasks.specific_bytes()
    smallest = math.ceil(path.min_size * unit.nbytes) + tasks.frozen_bytes()
    if max_bytes < smallest:
        raise SizeError(f"a budget of {format_bytes(max_bytes)} is below the smallest artifact method "
                        f"{path.method.get('name')!r} can make here: {format_bytes(smallest)} ({smallest} bytes; "
                        f"{format_bytes(fixed)} of it frozen and task-specific parameters)")
    return unit.of(max_bytes - tasks.frozen_bytes())


def path_unit(tasks: TaskSet, path: MergePath) -> ModelUnit:
    """The size unit of `path`'s sizes: one fine-tune of `tasks` as its method stores it."""
    return model_unit(tasks, _method(path.method["name"], _path_params(path)))


def _target(tasks: TaskSet, path: MergePath, size: float | None, max_bytes: int | None) -> float:
    if (size is None) == (max_bytes is None):
        raise ConfigError("give exactly one of size (model units) and max_bytes (a storage budget)")
    if size is not None:
        return size
    return min(size_for_budget(tasks, path, max_bytes), path.sizes[0])


def merge_to_disk(tasks: TaskSet, out: str | Path, *, size: float | str | None = None, max_bytes: int | None = None,
                  method: str | MergeMethod = "task_arithmetic",
                  params: Mapping[str, Any] | None = None, overwrite: bool = False, executor=None,
                  resume: bool = True, shard_bytes: int = SHARD_BYTES, device: str | None = None,
                  granularity: str = "sublayer", patterns: Mapping[str, str] | None = None,
                  options: PlanOptions | None = None, calibration: Calibration | None = None,
                  tokenizer_source: str | None = None, chat_template: str | None = None,
                  **option_fields: Any) -> dict[str, Any]:
    """Plan (`options` and/or its fields, as `plan`'s), then materialize block by block straight
    into an artifact; returns its manifest. `tokenizer_source`, `chat_template`: as `merge`'s.

    Memory holds one block's merge and one shard's buffer, not the model. With `resume`, an
    interrupted run of the same job continues where its last written shard ended. `device`: where
    planning and merging compute (as `plan`'s); what is written comes from host memory.
    """
    check_target(Path(out), overwrite, is_artifact, "a flex-model artifact")  # fail before the work, not after
    device = resolve_device(device, executor)  # an unavailable device fails before the work, too
    m = _method_for(tasks, method, params)
    options = PlanOptions.of(options, **option_fields)
    partition = discover_blocks(tasks, granularity, patterns)
    pipeline = fitted_pipeline(tasks, m, device)
    size, assignment, info = _plan_and_cut(tasks, partition, m, size, max_bytes, options, pipeline, device=device,
                                           executor=executor, calibration=calibration)
    header = ArtifactHeader(
        list(tasks.names), partition, dict(tasks.meta), assignment, m.describe(),
        point_size(tasks, partition, m, assignment.group_sizes()), model_unit(tasks, m), info,
        collect_hf_files(tasks, tokenizer_source, chat_template), dict(tasks.specific),
        size_from_stored=m.data_dependent_size)
    return write_artifact(
        out, header, {k: tasks.base.read(k) for k in tasks.frozen},
        lambda done: materialize_blocks(tasks, partition, assignment, m, pipeline, executor, skip=done, device=device),
        overwrite=overwrite, shard_bytes=shard_bytes, resumable=resume,
        specific=lambda: ((name, tasks.read_specific(t)) for t, name in enumerate(tasks.names)))


def load_for_merge(base: str | Path, models: Mapping[str, str | Path] | Sequence[str], *,
                   method: str | MergeMethod = "task_arithmetic", params: Mapping[str, Any] | None = None,
                   size: float | str | None = None, max_bytes: int | None = None, planner: str = "greedy",
                   merging: bool = True, **load_options: Any) -> TaskSet:
    """`load_tasks` whose validation pass also does the first pass of what a merge with `method`
    needs (`first_pass_for`, `uses_key_grams`), so that the merge reads the inputs once less.
    `merging=False`: for a plan alone. `load_options`: as `load_tasks`' (task_specific, executor, ...)."""
    names = list(parse_task_specs(models))
    m = _method(method, params).for_tasks(names)  # a method that cannot merge these tasks fails before the read
    return load_tasks(base, models, observers=first_pass_for(m, merging=merging, names=names),
                      key_grams=uses_key_grams(m, None, size, max_bytes, planner),
                      base_may_be_a_task=m.merges_weights, **load_options)


def merge_files(base: str | Path, models: Mapping[str, str | Path] | Sequence[str], out: str | Path, *,
                size: float | str | None = None, max_bytes: int | None = None,
                method: str | MergeMethod = "task_arithmetic", params: Mapping[str, Any] | None = None,
                overwrite: bool = False, executor=None, load_options: Mapping[str, Any] | None = None,
                options: PlanOptions | None = None, **merge_options: Any) -> dict[str, Any]:
    """Checkpoints in, artifact out, reading the inputs as few times as the method allows: the
    validation pass does the merge's first pass (`load_for_merge`), then `merge_to_disk`
    (`merge_options`: its other options, plan option fields included). Returns the manifest."""
    check_target(Path(out), overwrite, is_artifact, "a flex-model artifact")  # before the validation pass
    load_options = dict(load_options or {})
    if merge_options.get("tokenizer_source") == "base":  # mergekit's: every model over the base's vocabulary
        load_options.setdefault("vocabulary", "base")
    options = PlanOptions.of(options, **{k: merge_options.pop(k) for k in list(merge_options) if k in PLAN_FIELDS})
    tasks = load_for_merge(base, models, method=method, params=params, size=size, max_bytes=max_bytes,
                           planner=options.planner, executor=executor, **load_options)
    return merge_to_disk(tasks, out, size=size, max_bytes=max_bytes, method=method, params=params,
                         overwrite=overwrite, executor=executor, options=options, **merge_options)


def artifact_summary(path: str | Path) -> dict[str, Any]:
    """What `flexmerge inspect` shows of an artifact: tasks, method, size and its unit, stored bytes,
    each task's own parameters (`added_rows`: of a shared key, the rows a task added, e.g. tokens),
    and each block's groups by task name (from the validated manifest)."""
    m = read_manifest(path)
    tasks = m["tasks"]
    blocks = [{"name": b["name"], "groups": [[tasks[t] for t in g] for g in b["groups"]]} for b in m["blocks"]]
    return {"tasks": tasks, "method": m["method"], "size": m["size"], "unit_bytes": m["unit_bytes"],
            "stored_bytes": m["stored_bytes"], "frozen_bytes": m["frozen_bytes"],
            "task_specific_bytes": m.get("task_specific_bytes", 0),
            "task_specific": {t: sorted(keys) for t, keys in m.get("task_specific", {}).items()},
            "added_rows": {t: {k: v["shape"][0] for k, v in keys.items() if k in m["keys"]}
                           for t, keys in m.get("task_specific", {}).items() if any(k in m["keys"] for k in keys)},
            "granularity": m["granularity"], "flexmerge_version": m["flexmerge_version"], "blocks": blocks}


def _path_params(path: MergePath) -> dict[str, Any]:
    return {k: v for k, v in path.method.items() if k != "name"}


def _check_same_blocks(partition: Partition, path: MergePath) -> None:
    if partition.names() != path.block_names:
        raise ConfigError("the partition differs from the one the path was planned on (block names differ)")


def _info(path: MergePath, size: float, tasks: TaskSet, device=None) -> dict[str, Any]:
    point = path.point_at(size)
    info = _point_info(path.planner, path.options, point, path.num_points, size, tasks, device)
    if point < path.num_points - 1:  # (a last point cut without a plan cannot know it: both leave it out)
        info["next_size_up"] = path.next_size_up(point)
    return info


def _point_info(planner: str, options: dict[str, Any], point: int, points: int, size: float, tasks: TaskSet,
                device=None) -> dict[str, Any]:
    """The artifact's provenance; a GPU it was merged on is named, and tasks read over the base's
    vocabulary (their added tokens dropped) say so (otherwise the info is as it was)."""
    info = {"requested_size": size, "planner": planner, "plan_options": options,
            "path_point": point, "path_points": points,
            "inputs": tasks.provenance, "names": input_names(tasks.base, dict(zip(tasks.names, tasks.sources)))}
    if tasks.vocabulary != "tasks":
        info["vocabulary"] = tasks.vocabulary
    if device is not None and device.type != "cpu":
        info["device"] = str(device)
    return info
