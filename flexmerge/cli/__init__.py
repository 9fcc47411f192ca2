"""The `flexmerge` command line, one module per command group over library functions:
merge (plan, merge, inspect, export, methods), sweep (sweep, demo), serve (serve, route), pleas."""

from __future__ import annotations

from flexmerge.cli import merge, pleas, serve, sweep  # noqa: F401  (each registers its commands on `app`)
from flexmerge.cli.app import app, guarded

__all__ = ["app", "guarded", "main"]


def main() -> None:  # pragma: no cover - entry point
    app()
