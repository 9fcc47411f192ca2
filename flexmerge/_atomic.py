"""Atomic, exclusive writes: a file or directory appears complete under its final name, or not at all,
and never replaces anything the caller did not ask to replace.

- One writer per target: `.NAME.lock` beside it is held (flock) for the whole write, so a second
  flexmerge process writing the same target fails at once, naming the first (its pid).
- No silent replacement: the final rename uses `renameat2(RENAME_NOREPLACE)` (Linux), so a file or
  directory that appeared at the target during the write is left alone and the write fails.
  With `overwrite`, only a target that `replaceable` recognises (an artifact, an export) is
  replaced, and that check is repeated just before the rename.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import secrets
import stat
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from flexmerge.errors import FlexMergeError


class OutputExistsError(FlexMergeError):
    """The target exists (or appeared) and may not be replaced."""


class ConcurrentWriteError(FlexMergeError):
    """Another process is writing the same target."""


Replaceable = Callable[[Path], bool]


def never(_: Path) -> bool:
    return False


@contextmanager
def target_lock(final: Path) -> Iterator[None]:
    """Hold `.NAME.lock` beside `final` exclusively, or fail naming the holder."""
    lock = final.with_name(f".{final.name}.lock")
    while True:
        try:  # never through a symlink planted at the lock's name, never into a non-regular file
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EMLINK):
                raise FlexMergeError(f"{lock} is a symlink; flexmerge will not write through it: remove it") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:  # a hard link would truncate another file
            os.close(fd)
            raise FlexMergeError(f"{lock} is not a plain lock file (not regular, or hard-linked); remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConcurrentWriteError(
                f"{final} is being written by another flexmerge process (pid {holder}); wait for it to "
                f"finish or choose another output (lock: {lock})") from None
        try:  # the holder may have removed the lock file between our open and flock: retry on a fresh one
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        try:
            os.unlink(lock)
        finally:
            os.close(fd)


def check_target(final: Path, overwrite: bool, replaceable: Replaceable, what: str) -> None:
    """Fail unless `final` is absent, or `overwrite` is set and `final` is a `what` (replaceable)."""
    if not os.path.lexists(final):
        return
    if not overwrite:
        raise OutputExistsError(f"{final} already exists (pass overwrite=True / --overwrite to replace it)")
    if not replaceable(final):
        raise OutputExistsError(f"{final} exists and is not {what}; refusing to replace it even with "
                                "--overwrite: remove it yourself or choose another output")


@contextmanager
def atomic_directory(final: Path, overwrite: bool = False, partial: Path | None = None,
                     replaceable: Replaceable = never, what: str = "a flexmerge output") -> Iterator[Path]:
    """Yield a sibling work directory; on success it takes `final`'s name in one rename.

    Without `partial`, the work directory is fresh and removed on failure. With `partial` (a
    resumable job), that directory is reused and kept on failure, so a rerun can continue; it
    is hidden and holds no manifest, so it never loads as an artifact.
    """
    final = Path(final)
    check_target(final, overwrite, replaceable, what)
    _make_parent(final)
    with target_lock(final):
        check_target(final, overwrite, replaceable, what)  # again, now that no flexmerge writer can interfere
        if partial is None:
            tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial"))
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should not be
        else:
            tmp = partial
            if os.path.islink(tmp) or (os.path.lexists(tmp) and not tmp.is_dir()):
                raise FlexMergeError(f"{tmp} (the resumable work directory) is a symlink or not a directory; "
                                     "flexmerge will not write through it: remove it")
            tmp.mkdir(exist_ok=True)
        try:
            yield tmp
            _make_durable(tmp)
            check_target(final, overwrite, replaceable, what)
            _install(tmp, final)
        except BaseException:
            if partial is None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise


def _make_parent(final: Path) -> None:
    parent = final.parent
    if os.path.lexists(parent) and not parent.is_dir():
        raise FlexMergeError(f"cannot write {final}: {parent} is not a directory")
    parent.mkdir(parents=True, exist_ok=True)


def _make_durable(tmp: Path) -> None:
    for f in tmp.rglob("*"):
        if f.is_file() and not f.is_symlink():  # durable, and readable as the umask allows (some writers use 0600)
            mode = 0o666 & ~_umask()
            if f.stat().st_mode & 0o777 != mode:  # a chmod to the same mode would still dirty the inode
                os.chmod(f, mode)
            with open(f, "rb") as fh:  # (a shard already fsynced by its writer costs nothing here)
                os.fsync(fh.fileno())


def _install(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` (already vetted) is moved aside first, restored on failure."""
    old = None
    if os.path.lexists(final):
        old = final.with_name(f".{final.name}.old-{secrets.token_hex(4)}")
        rename_noreplace(final, old)
    try:
        rename_noreplace(tmp, final)
    except BaseException:
        if old is not None:
            rename_noreplace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink()


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`, failing with OutputExistsError if `dst` exists, even if it appears
    concurrently (atomic where the kernel and filesystem support RENAME_NOREPLACE)."""
    if _renameat2 is not None:
        r = _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if r == 0:
            return
        e = ctypes.get_errno()
        if e == errno.EEXIST:
            raise OutputExistsError(f"{dst} appeared while flexmerge was writing it; it was left alone "
                                    "(nothing was replaced)")
        if e not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(e, os.strerror(e), str(dst))
    if os.path.lexists(dst):  # fallback: check, then rename (racy only against writers other than flexmerge)
        raise OutputExistsError(f"{dst} appeared while flexmerge was writing it; it was left alone")
    os.rename(src, dst)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str, overwrite: bool = True, replaceable: Replaceable | None = None,
                      what: str = "a flexmerge output") -> None:
    write_bytes_atomic(path, text.encode(), overwrite=overwrite, replaceable=replaceable, what=what)


def write_bytes_atomic(path: Path, data: bytes, overwrite: bool = False, replaceable: Replaceable | None = None,
                       what: str = "a flexmerge output") -> None:
    """Write `data` to `path` in one rename. Without `overwrite` an existing file is never replaced,
    even one created concurrently; with it, only one that `replaceable` accepts (None: any regular file)."""
    path = Path(path)
    ok: Replaceable = replaceable or (lambda p: p.is_file() and not p.is_symlink())
    check_target(path, overwrite, ok, what)
    _make_parent(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # name the file (a full disk says nothing of where)
            raise OSError(e.errno, e.strerror, str(path)) from None
        check_target(path, overwrite, ok, what)
        if overwrite:
            os.replace(tmp, path)
        else:
            rename_noreplace(Path(tmp), path)
    finally:
        Path(tmp).unlink(missing_ok=True)
