"""`--eval-data`: the evaluator that fits the tasks' models, picked by their architecture."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from flexmerge.errors import ConfigError
from flexmerge.evaluation.classification import TextClassificationEvaluator
from flexmerge.evaluation.custom import Evaluator
from flexmerge.evaluation.generation import GenerationEvaluator, check_metric
from flexmerge.evaluation.hf import (
    CAUSAL_LM,
    KIND_NAMES,
    architecture,
    check_data_names,
    model_kind,
    task_side_files,
)
from flexmerge.taskvec import TaskSet


def data_evaluator(tasks: TaskSet, data: Mapping[str, str | Path], *, metric: str | None = None,
                   limit: int | None = 1000, batch_size: int = 32) -> Evaluator:
    """Sequence classifiers: accuracy on text + label rows (`TextClassificationEvaluator`); causal
    LMs: exact match of greedy completions, or with `metric="loglik"` the completions' token
    probability, on prompt + completion or chat rows (`GenerationEvaluator`). All tasks must be of
    one kind; `metric` (exact | loglik) applies to causal LMs only."""
    if metric is not None:
        check_metric(metric)
    check_data_names(tasks, data)
    kind = _one_kind(tasks)
    if kind == CAUSAL_LM:
        return GenerationEvaluator(tasks, data, metric=metric or "exact", limit=limit, batch_size=batch_size)
    if metric == "loglik":
        raise ConfigError(f"--eval-metric loglik scores causal LMs (*{CAUSAL_LM}); these tasks are sequence "
                          "classifiers, scored by accuracy")
    return TextClassificationEvaluator(tasks, data, limit=limit, batch_size=batch_size)


def _one_kind(tasks: TaskSet) -> str:
    """CLASSIFIER or CAUSAL_LM, the kind of every task's model."""
    files = task_side_files(tasks)
    kinds = {t: model_kind(architecture(files[t], t), t) for t in tasks.names}
    first = tasks.names[0]
    for task, kind in kinds.items():
        if kind != kinds[first]:
            raise ConfigError(f"--eval-data scores models of one kind; task {first!r} is {KIND_NAMES[kinds[first]]} "
                              f"and task {task!r} {KIND_NAMES[kind]} (give --evaluator instead)")
    return kinds[first]

