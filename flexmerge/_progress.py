"""Progress bars for long loops; silent when output is not a terminal or when disabled."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    disable = True if os.environ.get("FLEXMERGE_NO_PROGRESS") else None  # None: auto (TTY only)
    yield from tqdm(items, desc=desc, total=total, unit=unit, disable=disable, leave=False)
