"""Routed evaluation: a Runtime answering a mixed test set WITHOUT task ids (Twin-Merging's setting).

The runtime's router (`flexmerge.routing`, trained by `Runtime.train_router`) picks each test
input's task; the input then runs as that task (`Runtime.predict_routed(mode="argmax")`: its
weights and its head, the batch as one mixed pass). An input routed to another task is answered
in that task's label set, so it counts as wrong. The per-example mixture (`mode="mixture"`)
rebuilds the weights once per input and is not used here: on a test set of thousands of inputs it
costs thousands of weight rebuilds.

`flexmerge sweep --routed` scores every Twin point this way (`flexmerge.suites.routing.SuiteRouting`,
called by `flexmerge.curve.sweep`); benchmarks/twin_routed.py uses it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flexmerge.errors import ConfigError
from flexmerge.runtime.runtime import Runtime

ROUTED_MODE = "argmax"


@dataclass
class RoutedScore:
    """Per task: the fraction of its test inputs answered right when routed, and the fraction the
    router sent to it (the router's own accuracy on that task); `router_overall`: the router's
    accuracy over all inputs."""

    accuracy: dict[str, float]
    router_accuracy: dict[str, float]
    router_overall: float


def routed_score(runtime: Runtime, test: Sequence[tuple[str, str, int]], batch_size: int = 128) -> RoutedScore:
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
