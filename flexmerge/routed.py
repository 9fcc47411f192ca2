"""Routed evaluation: a flex model on a mixed test set WITHOUT task ids (Twin-Merging's setting).

A router (`flexmerge.routing`, trained by `Runtime.train_router` on the shared model's features of
a suite's validation split) picks each test input's task; the input then runs as that task
(`Runtime.predict_routed(mode="argmax")`: its weights and its head, the batch as one mixed pass).
An input routed to another task is answered in that task's label set, so it counts as wrong.
The per-example mixture (`mode="mixture"`) rebuilds the weights once per input and is not used
here: on a test set of thousands of inputs it costs thousands of weight rebuilds.

`flexmerge sweep --routed` evaluates every Twin point this way (`SuiteRouting`, called by
`flexmerge.curve.sweep`); benchmarks/twin_routed.py uses it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flexmerge.errors import ConfigError
from flexmerge.methods.base import parse_method_spec

ROUTED_MODE = "argmax"


@dataclass
class RoutedScore:
    """Per task: the fraction of its test inputs answered right when routed, and the fraction the
    router sent to it (the router's own accuracy on that task); `router_overall`: the router's
    accuracy over all inputs."""

    accuracy: dict[str, float]
    router_accuracy: dict[str, float]
    router_overall: float


def is_twin_spec(spec: str) -> bool:
    """A sweep entry naming the twin method ('twin', 'twin:rank=7'): the points `--routed` evaluates."""
    return parse_method_spec(spec)[0] == "twin"


def check_routed(suite: Any, methods: Sequence[str]) -> None:
    """Fail before any zoo is built: routing needs twin points to route and a text suite to learn from."""
    if not any(is_twin_spec(m) for m in methods):
        raise ConfigError("--routed evaluates the twin points of a sweep without task ids, and --methods names "
                          f"no twin method ({', '.join(methods)}); add one, e.g. twin:rank=7")
    reason = suite.serving_reason()
    if reason:
        raise ConfigError(f"--routed needs a text suite (the router learns from text inputs): {reason}")


def routed_score(runtime: Any, test: Sequence[tuple[str, str, int]], batch_size: int = 128) -> RoutedScore:
    """Route every (text, task, label) of `test` by `runtime`'s router, without its task, and score it:
    right when routed to its own task and answered with its label."""
    if not test:
        raise ConfigError("no test inputs to route")
    right: dict[str, int] = {}
    routed_home: dict[str, int] = {}
    count: dict[str, int] = {}
    for start in range(0, len(test), batch_size):
        chunk = test[start:start + batch_size]
        answers = runtime.predict_routed([x for x, _, _ in chunk], mode=ROUTED_MODE)
        for (_, task, label), answer in zip(chunk, answers):
            home = answer["task"] == task
            count[task] = count.get(task, 0) + 1
            routed_home[task] = routed_home.get(task, 0) + home
            right[task] = right.get(task, 0) + (home and answer["label"] == runtime.task_info(task)["labels"][label])
    return RoutedScore({t: right[t] / count[t] for t in count}, {t: routed_home[t] / count[t] for t in count},
                       sum(routed_home.values()) / len(test))


class SuiteRouting:
    """Routed evaluation of a suite's flex models: per model, a router trained on the suite's
    validation split (`Suite.router_calibration`), then its test split routed (`routed_score`).

    `batch_size` defaults to 64, not Twin-Merging's 1024: with a few hundred examples per task,
    1024 would give the router two steps per epoch."""

    def __init__(self, suite: Any, zoo: Any, *, per_task: int | None = None, epochs: int = 50,
                 batch_size: int = 64, seed: int = 0):
        self.options = suite.serve_options(zoo)
        self.calibration = suite.router_calibration(per_task)
        self.test = suite.labelled_texts("test")
        self.fit = {"epochs": epochs, "batch_size": batch_size, "seed": seed}

    def __call__(self, flex: Any) -> RoutedScore:
        from flexmerge.serve import Runtime
        from flexmerge.serve.runtime import release_freed_memory

        runtime = Runtime(flex, **self.options)
        runtime.train_router(self.calibration, **self.fit)
        try:
            return routed_score(runtime, self.test)
        finally:
            flex.router = None  # the sweep's model stays as it was materialized
            del runtime
            release_freed_memory()

    def describe(self) -> dict[str, Any]:
        """What the results' meta records about the routed evaluation."""
        return {"mode": ROUTED_MODE, "calibration": "validation split", "calibration_examples": len(self.calibration),
                "test_examples": len(self.test), "router": self.fit}
