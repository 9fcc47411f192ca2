"""Routed evaluation of a suite's flex models (`flexmerge sweep --routed`): each twin point is
scored without task ids by a router trained on the suite's own validation split.

The scoring itself is `flexmerge.runtime.routed`; this module adds what a suite knows: its
calibration and test texts and its heads (`Suite.serve_options`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flexmerge.errors import ConfigError
from flexmerge.flexmodel import FlexModel
from flexmerge.methods.base import MethodSpec
from flexmerge.runtime import RoutedScore, Runtime, release_freed_memory, routed_score
from flexmerge.runtime.routed import ROUTED_MODE
from flexmerge.suites.base import Suite, Zoo


def check_routed(suite: Suite, methods: Sequence[str]) -> None:
    """Fail before any zoo is built: routing needs twin points to route and a text suite to learn from."""
    if not any(MethodSpec.parse(m).name == "twin" for m in methods):
        raise ConfigError("--routed evaluates the twin points of a sweep without task ids, and --methods names "
                          f"no twin method ({', '.join(methods)}); add one, e.g. twin:rank=7")
    reason = suite.serving_reason()
    if reason:
        raise ConfigError(f"--routed needs a text suite (the router learns from text inputs): {reason}")


class SuiteRouting:
    """Routed evaluation of a suite's flex models: per model, a router trained on the suite's
    validation split (`Suite.router_calibration`), then its test split routed (`routed_score`).

    `batch_size` defaults to 64, not Twin-Merging's 1024: with a few hundred examples per task,
    1024 would give the router two steps per epoch."""

    def __init__(self, suite: Suite, zoo: Zoo, *, per_task: int | None = None, epochs: int = 50,
                 batch_size: int = 64, seed: int = 0):
        self.options = suite.serve_options(zoo)
        self.calibration = suite.router_calibration(per_task)
        self.test = suite.labelled_texts("test")
        self.fit = {"epochs": epochs, "batch_size": batch_size, "seed": seed}

    def __call__(self, flex: FlexModel) -> RoutedScore:
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
