"""Atomic writes: a file or a directory appears complete under its final name, or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flexmerge.errors import FlexMergeError


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode(), overwrite=True)


@contextmanager
def atomic_directory(final: Path, overwrite: bool = False, partial: Path | None = None) -> Iterator[Path]:
    """Yield a sibling work directory; on success it replaces `final` in one rename.

    Without `partial`, the work directory is fresh and removed on failure. With `partial` (a
    resumable job), that directory is reused and kept on failure, so a rerun can continue; it
    is hidden and holds no manifest, so it never loads as an artifact.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FlexMergeError(f"{final} already exists (pass overwrite=True / --overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    if partial is None:
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial"))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should not be
    else:
        tmp = partial
        tmp.mkdir(exist_ok=True)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():  # durable, and readable as the umask allows (some writers use 0600)
                os.chmod(f, 0o666 & ~_umask())
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        if partial is None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: Path, data: bytes, overwrite: bool = False) -> None:
    if path.exists() and not overwrite:
        raise FlexMergeError(f"{path} already exists (pass overwrite=True / --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
