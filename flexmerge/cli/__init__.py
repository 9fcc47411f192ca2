"""The `flexmerge` command line, one module per command group over library functions:
merge (plan, merge, inspect, export, methods), sweep (sweep, demo), serve (serve, route), pleas."""

from __future__ import annotations

# each module registers its commands on `app`, in the order `flexmerge --help` lists them
from flexmerge.cli import merge  # noqa: F401, I001
from flexmerge.cli import sweep  # noqa: F401
from flexmerge.cli import serve  # noqa: F401
from flexmerge.cli import pleas  # noqa: F401
from flexmerge.cli.app import app, guarded

__all__ = ["app", "guarded", "main"]


def main() -> None:  # pragma: no cover - entry point
    app()
