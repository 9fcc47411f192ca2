"""Progress of long work, in any terminal and in logs.

On a terminal: a tqdm bar. Off a terminal (a log file, CI, a pipe): plain lines on stderr, one
every `FLEXMERGE_PROGRESS_INTERVAL` seconds (default 10) while the work lasts and one when it
ends (work done within the first interval prints nothing), each with the count, elapsed time,
an estimate of the time left, and what the work reports (a training loss, the point evaluated).
`FLEXMERGE_NO_PROGRESS=1` silences both.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

T = TypeVar("T")
DEFAULT_INTERVAL = 10.0


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("FLEXMERGE_PROGRESS_INTERVAL", DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def clock(seconds: float) -> str:
    """7 -> '0:07', 3725 -> '1:02:05'."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """A counter of `total` units of work that shows itself (see the module's docstring)."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "it", stream: TextIO | None = None,
                 interval: float | None = None):
        self.desc, self.total, self.unit, self.done = desc, total, unit, 0
        self.fields: dict[str, Any] = {}
        self.stream = stream or sys.stderr
        self.interval = _interval() if interval is None else interval
        self.start = self.last = time.monotonic()
        self.enabled = not os.environ.get("FLEXMERGE_NO_PROGRESS")
        self.bar = None
        self.printed = False
        if self.enabled and _is_tty(self.stream):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=self.stream)

    def update(self, n: int = 1, **fields: Any) -> None:
        """`n` more units done; `fields` (e.g. loss=0.41) are shown from now on."""
        self.done += n
        self.fields.update(fields)
        if self.bar is not None:
            if fields:
                self.bar.set_postfix({k: _short(v) for k, v in self.fields.items()}, refresh=False)
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last >= self.interval:
            self._line()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.printed:
            self._line(final=True)
        self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def line(self, final: bool = False) -> str:
        """What an off-terminal line says now."""
        elapsed = time.monotonic() - self.start
        count = f"{self.done}/{self.total} {self.unit}" if self.total else f"{self.done} {self.unit}"
        parts = [f"{self.desc}: {count}"]
        parts += [f"{k} {_short(v)}" for k, v in self.fields.items()]
        parts.append(f"{clock(elapsed)} elapsed")
        if final:
            parts.append("done")
        elif self.total and self.done:
            parts.append(f"~{clock(elapsed / self.done * (self.total - self.done))} left")
        return ", ".join(parts)

    def _line(self, final: bool = False) -> None:
        self.last, self.printed = time.monotonic(), True
        print(self.line(final), file=self.stream, flush=True)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Iterate `items` with a `Progress` of them."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Progress(desc, total, unit) as bar:
        for item in items:
            yield item
            bar.update()
