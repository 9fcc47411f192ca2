"""Names and paths that come from data (task names, index and manifest entries) stay inside their root.

Every file flexmerge opens because a file *said so* (a shard named by an index, a shard or a
side file named by a manifest) goes through `inside`, and every task name, which becomes a
directory name in artifacts, goes through `check_task_name`, before anything is touched.
"""

from __future__ import annotations

import re
from pathlib import Path

from flexmerge.errors import FlexMergeError

TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TASK_NAME_RULE = ("1-128 characters of letters, digits, '.', '_' or '-', starting with a letter or digit "
                  "(a task name becomes a directory name)")


class UnsafePathError(FlexMergeError):
    """A path taken from data points outside the directory it must stay in, or a name is unsafe."""


def check_task_name(name: object, where: str = "") -> str:
    """`name` if it is a safe task name; else an error saying what is allowed."""
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        prefix = f"{where}: " if where else ""
        raise UnsafePathError(f"{prefix}task name {name!r} is not allowed: use {TASK_NAME_RULE}")
    return name


def inside(root: Path, relative: object, what: str = "path", also: Path | None = None) -> Path:
    """`root / relative`, resolved (symlinks followed), if it stays inside `root` (or `also`); else an error.

    Absolute paths, empty names, NUL bytes, and anything that leaves `root` once `..` and symlinks
    are resolved are refused, whatever exists on disk. `also` is a second allowed root: a shard
    index that is itself a symlink (a Hugging Face cache snapshot) may name shards beside its target.
    """
    if not isinstance(relative, str) or not relative or "\0" in relative:
        raise UnsafePathError(f"{root}: {what} {str(relative)[:100]!r} is not a relative file name")
    if len(relative) > 1024 or any(len(c.encode(errors="surrogateescape")) > 255 for c in relative.split("/")):
        raise UnsafePathError(f"{root}: {what} {relative[:60]!r}... is too long to be a file name")
    rel = Path(relative)
    if rel.is_absolute() or relative.startswith("~"):
        raise UnsafePathError(f"{root}: {what} {relative!r} is an absolute path; only names inside {root} are allowed")
    try:
        real_root = Path(root).resolve()
        target = (real_root / rel).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop, an unreadable directory
        raise UnsafePathError(f"{root}: {what} {relative!r} cannot be resolved ({e})") from None
    roots = {real_root} | ({Path(also).resolve()} if also is not None else set())
    if not any(target == r or r in target.parents for r in roots):
        raise UnsafePathError(f"{root}: {what} {relative!r} points outside {root}; refused")
    return target
