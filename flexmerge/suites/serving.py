"""Serving a suite's zoo: merged to a size once, cached, and loaded with the suite's heads and
label names. A recipe on top of `flexmerge.runtime` (which knows nothing of suites)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flexmerge.api import merge_files
from flexmerge.errors import ConfigError
from flexmerge.flexmodel.read import is_artifact, read_manifest
from flexmerge.methods import get_method
from flexmerge.runtime import Runtime
from flexmerge.suites import get_suite
from flexmerge.suites.base import Suite, Zoo, default_cache_dir, get_zoo


def suite_artifact(suite: Suite, size: float, method: str = "task_arithmetic", cache_dir: str | Path | None = None,
                   log: Callable[[str], None] = print) -> tuple[Path, Zoo]:
    """(artifact, zoo): the suite's zoo (built or reused) merged to `size` with `method`, cached as
    `<cache>/served/<zoo>-<method>-<size>x` and reused when present; `method` may carry its
    parameters (`twin:rank=7`, as in `flexmerge sweep --methods`). Only suites that take text
    (`suite.serving_reason()` is None) are served."""
    reason = suite.serving_reason()
    if reason:
        raise ConfigError(reason)
    get_method(method)  # 'twin:rank=7' (a method with its parameters): a typo fails now, not after the zoo
    zoo = get_zoo(suite, Path(cache_dir) if cache_dir else None, log=log)
    name_of_entry = f"{zoo.directory.name}-{cache_label(method)}-{float(size):g}x"
    out = Path(cache_dir or default_cache_dir()) / "served" / name_of_entry
    if not is_artifact(out):
        log(f"merging the {suite.name!r} zoo to {float(size):g}x with {method} into {out} (cached for later runs)")
        merge_files(zoo.base, zoo.models, out, size=size, method=method, load_options=suite.load_options())
    return out, zoo


def suite_runtime(suite: str | Suite, size: float, method: str = "task_arithmetic",
                  cache_dir: str | Path | None = None, log: Callable[[str], None] = print) -> Runtime:
    """A benchmark suite's zoo (built or reused) merged to `size` (the artifact cached, see
    `suite_artifact`), served with the suite's heads and label names."""
    suite = get_suite(suite) if isinstance(suite, str) else suite
    path, zoo = suite_artifact(suite, size, method, cache_dir, log)
    return Runtime.load(path, **suite.serve_options(zoo))


def cache_label(method: str) -> str:
    """A method spec as part of a directory name: 'twin:rank=7' -> 'twin_rank=7' (only [A-Za-z0-9._=-])."""
    return re.sub(r"[^A-Za-z0-9._=-]", "_", method)[:100]


def suite_serve_options(artifact: str | Path, name: str, cache_dir: str | Path | None = None,
                        log: Callable[[str], None] = print) -> tuple[Suite, dict[str, Any]]:
    """(suite, Runtime options: its tokenizer, config, heads and label names) for an artifact merged
    from the text suite `name`'s zoo (whose files hold no Hugging Face config); the artifact's tasks
    must be the suite's."""
    suite = get_suite(name)
    reason = suite.serving_reason() or suite.unavailable_reason()
    if reason:
        raise ConfigError(f"--suite {name}: {reason}")
    tasks = read_manifest(artifact)["tasks"]
    if sorted(tasks) != sorted(suite.task_names()):
        raise ConfigError(f"{artifact} holds the tasks {', '.join(tasks)}, not the {name} suite's "
                          f"({', '.join(suite.task_names())})")
    return suite, suite.serve_options(get_zoo(suite, Path(cache_dir) if cache_dir else None, log=log))
