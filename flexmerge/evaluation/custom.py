"""Your own evaluator, named `package.module:function`, and the contract every evaluator keeps."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from flexmerge.errors import ConfigError, FlexMergeError

Evaluator = Callable[[str, dict[str, torch.Tensor]], float]


def load_evaluator(spec: str) -> Evaluator:
    """The function named by `package.module:function`."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--evaluator {spec!r} must be package.module:function")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"--evaluator {spec!r}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"--evaluator {spec!r}: {module_name!r} has no function {attr!r}")
    return checked(fn, spec)


def checked(fn: Callable, name: str) -> Evaluator:
    """Scores must be finite numbers: a NaN would silently poison every average."""
    def evaluate(task: str, state: dict[str, torch.Tensor]) -> float:
        score = fn(task, state)
        try:
            value = float(score)
        except (TypeError, ValueError):
            raise FlexMergeError(f"evaluator {name} returned {score!r} for task {task!r}, not a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise FlexMergeError(f"evaluator {name} returned {value} for task {task!r}")
        return value
    return evaluate
