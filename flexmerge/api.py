"""The public verbs, in data-flow order: load -> blocks -> plan -> materialize -> save/load."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flexmerge import blocks as _blocks
from flexmerge.blocks import Partition
from flexmerge._atomic import check_target
from flexmerge.flexmodel.artifact import SHARD_BYTES, ArtifactHeader, is_artifact, write_artifact
from flexmerge.flexmodel.materialize import collect_hf_files, materialize_blocks
from flexmerge.flexmodel.materialize import materialize as _materialize
from flexmerge.flexmodel.model import FlexModel
from flexmerge.methods.base import MergeMethod, get_method
from flexmerge.planning import MergePath, build_path
from flexmerge.preprocess import fitted_pipeline
from flexmerge.size import SizeModel
from flexmerge.taskvec import TaskSet, load_tasks

__all__ = ["load_tasks", "discover_blocks", "plan", "materialize", "merge", "merge_to_disk"]


def discover_blocks(tasks: TaskSet, granularity: str = "sublayer", patterns: Mapping[str, str] | None = None) -> Partition:
    """Partition the mergeable parameters of `tasks` into blocks (see `flexmerge.blocks`)."""
    return _blocks.discover_blocks(tasks.mergeable, tasks.meta, granularity, patterns)


def _method(method: str | MergeMethod, params: Mapping[str, Any] | None) -> MergeMethod:
    if isinstance(method, MergeMethod):
        return method
    return get_method(method, **dict(params or {}))


def plan(
    tasks: TaskSet,
    partition: Partition | None = None,
    *,
    method: str | MergeMethod = "task_arithmetic",
    params: Mapping[str, Any] | None = None,
    granularity: str = "sublayer",
    patterns: Mapping[str, str] | None = None,
    planner: str = "greedy",
    linkage: str = "min",
    mode: str = "constituent",
    measure: str = "cosine",
    seed: int = 0,
    executor=None,
) -> MergePath:
    """The merge path from M× to the method's smallest size; cut it with `path.cut(size)`."""
    partition = partition or discover_blocks(tasks, granularity, patterns)
    return build_path(tasks, partition, _method(method, params), planner=planner, linkage=linkage,
                      mode=mode, measure=measure, seed=seed, executor=executor)


def materialize(
    tasks: TaskSet, path: MergePath, size: float, *, partition: Partition | None = None,
    method: str | MergeMethod | None = None, params: Mapping[str, Any] | None = None,
) -> FlexModel:
    """The flex model at `size` along `path`, with the method the path was planned for."""
    m = _method(method or path.method["name"], params if method else _path_params(path))
    partition = partition or discover_blocks(tasks, path.options["granularity"])
    _check_same_blocks(partition, path)
    return _materialize(tasks, partition, path.cut(size), m, info=_info(path, size))


def merge(tasks: TaskSet, *, size: float, method: str | MergeMethod = "task_arithmetic",
          params: Mapping[str, Any] | None = None, **plan_options: Any) -> FlexModel:
    """Plan and materialize in one call: the flex model of `tasks` at `size`."""
    m = _method(method, params)
    partition = discover_blocks(tasks, plan_options.pop("granularity", "sublayer"), plan_options.pop("patterns", None))
    path = plan(tasks, partition, method=m, **plan_options)
    return _materialize(tasks, partition, path.cut(size), m, info=_info(path, size))


def merge_to_disk(tasks: TaskSet, out: str | Path, *, size: float, method: str | MergeMethod = "task_arithmetic",
                  params: Mapping[str, Any] | None = None, overwrite: bool = False, executor=None,
                  resume: bool = True, shard_bytes: int = SHARD_BYTES, **plan_options: Any) -> dict[str, Any]:
    """Plan, then materialize block by block straight into an artifact; returns its manifest.

    Memory holds one block's merge and one shard's buffer, not the model. With `resume`, an
    interrupted run of the same job continues where its last written shard ended.
    """
    check_target(Path(out), overwrite, is_artifact, "a flex-model artifact")  # fail before the work, not after
    m = _method(method, params)
    partition = discover_blocks(tasks, plan_options.pop("granularity", "sublayer"), plan_options.pop("patterns", None))
    path = plan(tasks, partition, method=m, executor=executor, **plan_options)
    assignment = path.cut(size)
    pipeline = fitted_pipeline(tasks, m)
    header = ArtifactHeader(
        list(tasks.names), partition, dict(tasks.meta), assignment, m.describe(),
        SizeModel.build(partition, tasks.meta, m).size(assignment.group_sizes()), tasks.unit_bytes(),
        _info(path, size, tasks), collect_hf_files(tasks))
    return write_artifact(
        out, header, {k: tasks.base.read(k) for k in tasks.frozen},
        lambda done: materialize_blocks(tasks, partition, assignment, m, pipeline, executor, skip=done),
        overwrite=overwrite, shard_bytes=shard_bytes, resumable=resume)


def _path_params(path: MergePath) -> dict[str, Any]:
    return {k: v for k, v in path.method.items() if k != "name"}


def _check_same_blocks(partition: Partition, path: MergePath) -> None:
    from flexmerge.errors import ConfigError

    if partition.names() != path.block_names:
        raise ConfigError("the partition differs from the one the path was planned on (block names differ)")


def _info(path: MergePath, size: float, tasks: TaskSet | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {"requested_size": size, "planner": path.planner, "plan_options": path.options,
                            "path_point": path.point_at(size), "path_points": path.num_points}
    if tasks is not None:
        info["inputs"] = tasks.provenance
    return info
