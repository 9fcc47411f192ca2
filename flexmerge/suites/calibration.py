"""Calibration inputs by suite name: what `flexmerge pleas --calibration digits` merges on.

Suites are recipes above the library, so the library takes calibration inputs from its caller and
never looks a suite up; the CLI turns a suite name into inputs here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from flexmerge.errors import ConfigError
from flexmerge.suites import SUITES, get_suite


def validation_inputs(name: str, tasks: Sequence[str] = ()) -> torch.Tensor:
    """The validation inputs of suite `name`'s tasks named like the merged models (`tasks`), else of
    all its tasks; a ConfigError when `name` is not a suite's name (it names a file that is not there)."""
    if "/" in name or Path(name).suffix:
        raise ConfigError(f"calibration {name!r} is neither a file nor a suite name "
                          f"(suites: {', '.join(sorted(SUITES))})")
    return get_suite(name).validation_inputs(tasks)
