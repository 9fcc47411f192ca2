"""Offline benchmark suites: recipes on top of the library (never imported by its core)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flexmerge.curve import sweep
from flexmerge.errors import UnknownNameError
from flexmerge.planning import DATA_PLANNERS
from flexmerge.report import write_results
from flexmerge.suites.base import Suite, Zoo, default_cache_dir, get_zoo
from flexmerge.suites.digits import DigitsSuite
from flexmerge.suites.fashion import FashionSuite
from flexmerge.suites.routing import SuiteRouting, check_routed
from flexmerge.suites.wordgen import WordGenLoraSuite, WordGenSuite
from flexmerge.suites.wordnet import WordNetSuite
from flexmerge.taskvec import load_tasks

SUITES: dict[str, Callable[[], Suite]] = {
    "wordnet": WordNetSuite, "wordnet20": lambda: WordNetSuite(num_tasks=20),
    "wordnet30": lambda: WordNetSuite(num_tasks=30), "digits": DigitsSuite, "fashion": FashionSuite,
    "wordgen": WordGenSuite, "wordgen-lora": WordGenLoraSuite,
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise UnknownNameError("suite", name, SUITES)
    return SUITES[name]()


def run_sweep(suite: Suite, out: str | Path, *, methods, sizes, planners=("greedy",), granularity="sublayer",
              cache_dir: Path | None = None, rebuild: bool = False, routed: bool = False, log=print,
              split: str = "test", **sweep_options: Any):
    """Build or reuse the suite's zoo, sweep it (scored on `split`), and write the results; returns
    (result, paths). Data-aware planners get the suite's unlabelled calibration inputs; `routed`: also
    evaluate every twin point without task ids (`flexmerge.suites.routing.SuiteRouting`)."""
    if routed:
        check_routed(suite, methods)  # before the zoo is built
    t0 = time.perf_counter()
    zoo = get_zoo(suite, cache_dir, rebuild=rebuild, log=log)
    t1 = time.perf_counter()
    tasks = load_tasks(zoo.base, zoo.models, **suite.load_options())
    calibration = suite.calibration(zoo) if set(planners) & set(DATA_PLANNERS) else None
    routing = SuiteRouting(suite, zoo) if routed else None
    result = sweep(tasks, suite.evaluator(zoo, split), methods=methods, sizes=sizes, planners=planners,
                   granularity=granularity, base_accuracy=suite.base_scores(zoo), routed=routing, log=log,
                   calibration=calibration, **sweep_options)
    result.timings = {"zoo (build or verify)": t1 - t0, **result.timings, "total": time.perf_counter() - t0}
    result.meta.update({"suite": suite.name, "split": split, "zoo": str(zoo.directory), "zoo_build_seconds": zoo.info.get("build_seconds"),
                        "zoo_finetuned_accuracy": zoo.info.get("finetuned"), "score_name": suite.score_name,
                        "base_name": suite.base_name})
    if routing is not None:
        result.meta["routed"] = routing.describe()
    return result, write_results(result, out)


__all__ = ["SUITES", "Suite", "Zoo", "default_cache_dir", "get_suite", "get_zoo", "run_sweep"]
