"""The `flexmerge` Typer app, its consoles and its one error boundary, which every command runs in."""

from __future__ import annotations

import errno
import functools
import os
import warnings
from collections.abc import Callable
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from flexmerge.errors import FlexMergeError, FlexMergeWarning
from flexmerge.extras import missing_extra_error

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Merge M fine-tuned models into one artifact of any size between 1x and Mx.")
console = Console(highlight=False)
err = Console(stderr=True)

_STATE = {"debug": bool(os.environ.get("FLEXMERGE_DEBUG"))}


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="show the Python traceback of an unexpected error")
             ) -> None:
    """Merge M fine-tuned models into one artifact of any size between 1x and Mx."""
    _STATE["debug"] = debug or _STATE["debug"]


def say_error(message: str) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)


def log_dim(message: str) -> None:
    """Progress notes of long work, on stderr, so stdout stays the command's answer."""
    err.print(f"[dim]{escape(message)}[/]", soft_wrap=True)


def _os_error_message(e: OSError) -> str:
    what = e.strerror or str(e)
    where = f" {e.filename}" if e.filename else ""
    hint = {errno.ENOSPC: "free some space or choose another output",
            errno.EACCES: "check the file's permissions", errno.EPERM: "check the file's permissions",
            errno.EROFS: "choose an output on a writable filesystem"}.get(e.errno, "")
    return f"cannot access{where}: {what}" + (f" ({hint})" if hint else "")


def guarded(command: Callable) -> Callable:
    """The CLI's one error boundary: a user error (bad input, bad option, unreadable or unwritable
    file, full disk) is one line on stderr and exit 2; anything else is an internal error that
    says so, exit 1, with the traceback only under --debug."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", FlexMergeWarning)
                warnings.showwarning = _note
                return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):  # typer's own exits and usage errors
            raise
        except FlexMergeError as e:
            say_error(str(e))
            raise typer.Exit(2) from None
        except OSError as e:
            if _STATE["debug"]:
                raise
            say_error(_os_error_message(e))
            raise typer.Exit(2) from None
        except ModuleNotFoundError as e:
            missing = missing_extra_error(e)
            if missing is None:
                internal_error(e)
            say_error(str(missing))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            say_error("interrupted; a resumable merge continues where it stopped when the same command is rerun")
            raise typer.Exit(130) from None
        except Exception as e:
            internal_error(e)
    return run


def _note(message, category, *args, **kwargs) -> None:
    """A FlexMergeWarning as one `note:` line on stderr; other warnings as Python prints them."""
    if issubclass(category, FlexMergeWarning):
        err.print(f"[yellow]note:[/] {escape(str(message))}", soft_wrap=True, highlight=False)
    else:
        _SHOW_WARNING(message, category, *args, **kwargs)


_SHOW_WARNING = warnings.showwarning


def internal_error(e: Exception) -> NoReturn:
    """Anything that is not the user's doing: say so (exit 1); the traceback only under --debug."""
    if _STATE["debug"]:
        raise e
    say_error(f"internal error ({type(e).__name__}: {e}); this is a bug in flexmerge, not in your input. "
              "Rerun with --debug (flexmerge --debug COMMAND ...) for the traceback and report it.")
    raise typer.Exit(1) from None


def command(f: Callable) -> Callable:
    """Register `f` as a top-level command, inside the error boundary."""
    return app.command()(guarded(f))
