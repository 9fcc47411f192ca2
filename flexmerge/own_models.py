"""A sweep of the user's own models: a recipe on top of the library, as the suites are for their zoos.

Sizes mean what `flexmerge merge --size` means (each task's own parameters count), so a row of the
results is the artifact that merge would write. The score of a task's weights is the user's
evaluator (`package.module:function`) or, on one data file per task, the evaluator that fits the
tasks' Hugging Face architecture (`data_evaluator`: a classifier's accuracy on labelled text, a
causal LM's exact match or completion likelihood).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from flexmerge.config import MergeConfig
from flexmerge.curve import SweepResult, spec_method, sweep
from flexmerge.errors import ConfigError
from flexmerge.evaluation import check_metric, data_evaluator, load_evaluator
from flexmerge.executors import get_executor
from flexmerge.planning import get_planner
from flexmerge.report import write_results
from flexmerge.taskvec import load_tasks


def check_sweep_names(methods: Sequence[str], planners: Sequence[str]) -> None:
    """A typo in a method spec or a planner fails now, before any training or validation pass."""
    for m in methods:
        spec_method(m)
    for p in planners:
        get_planner(p)


def sweep_own_models(cfg: MergeConfig, out: str | Path, *, methods: Sequence[str], sizes: Sequence[float],
                     planners: Sequence[str] = ("greedy",), evaluator: str | None = None,
                     eval_data: Mapping[str, str | Path] | None = None, eval_limit: int | None = 1000,
                     eval_batch_size: int = 32, eval_metric: str | None = None,
                     log: Callable[[str], None] = lambda s: None) -> tuple[SweepResult, dict[str, Path]]:
    """Sweep the models `cfg` names, scored by `evaluator` or on `eval_data` (one file per task;
    exactly one of the two), and write the results to `out`; returns (result, paths).
    `eval_metric` (causal LMs with `eval_data`): exact (default) or loglik.
    `cfg.params` apply to `cfg.method` when `methods` includes it."""
    check_sweep_names(methods, planners)
    if (evaluator is None) == (not eval_data):
        raise ConfigError("own models need exactly one of an evaluator (package.module:function) or labelled "
                          "eval data (TASK=FILE, one per task)")
    if eval_metric is not None:
        if evaluator:
            raise ConfigError("--eval-metric goes with --eval-data, not with --evaluator")
        check_metric(eval_metric)
    score = load_evaluator(evaluator) if evaluator else None
    tasks = load_tasks(cfg.base, cfg.models, executor=get_executor(cfg.executor, address=cfg.ray_address),
                       **cfg.load_options())
    if score is None:
        score = data_evaluator(tasks, dict(eval_data or {}), metric=eval_metric, limit=eval_limit,
                               batch_size=eval_batch_size)
    result = sweep(tasks, score, methods=methods, sizes=sizes, planners=planners,
                   params={cfg.method: cfg.params} if cfg.params else None, granularity=cfg.granularity,
                   options=cfg.plan_options(), device=cfg.device, log=log)
    result.meta.update({"base": str(cfg.base), "models": {k: str(v) for k, v in cfg.models.items()},
                        "evaluator": evaluator or {"eval_data": [f"{t}={p}" for t, p in (eval_data or {}).items()],
                                                   "limit": eval_limit, "metric": getattr(score, "metric", None)}})
    return result, write_results(result, out)


__all__ = ["check_sweep_names", "sweep_own_models"]
