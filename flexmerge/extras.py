"""Optional dependencies: which pip extra brings which module, and one clear error when one is missing.

The core package (`pip install flexmerge`) plans, merges, exports and inspects. The suites
(`flexmerge demo`, `sweep --suite`), the HTTP server and the Ray executor need more; a command
that needs an extra that is not installed names it in one line instead of a traceback.
"""

from __future__ import annotations

import importlib.util

from flexmerge.errors import ConfigError

# extra -> the top-level modules it installs that flexmerge imports (pyproject.toml's
# [project.optional-dependencies] must list each of them; a test checks it)
EXTRAS: dict[str, tuple[str, ...]] = {
    "suites": ("transformers", "sklearn", "matplotlib", "tokenizers", "peft"),
    "serve": ("fastapi", "uvicorn", "transformers"),
    "ray": ("ray",),
}

# the extra to name when a module is missing (transformers is in two: the first listed, the suites',
# is the smaller ask)
MODULE_EXTRA: dict[str, str] = {m: extra for extra, modules in reversed(EXTRAS.items()) for m in modules}


class MissingExtraError(ConfigError):
    """A command needs an optional dependency that is not installed."""


def install_hint(extra: str) -> str:
    return f"pip install 'flexmerge[{extra}]'"


def missing_modules(extra: str) -> list[str]:
    """The modules of `extra` that cannot be imported here."""
    return [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]


def require_extra(extra: str, what: str) -> None:
    """Fail in one line, before any work, when `what` needs `extra` and it is not installed."""
    missing = missing_modules(extra)
    if missing:
        raise MissingExtraError(f"{what} needs the '{extra}' extra ({', '.join(missing)} not installed): "
                                f"{install_hint(extra)}")


def missing_extra_error(error: ModuleNotFoundError) -> MissingExtraError | None:
    """The one-line error for an import of an optional module that failed, or None when the
    module is not one an extra brings (then it is a real bug, not a missing install)."""
    top = (error.name or "").split(".")[0]
    extra = MODULE_EXTRA.get(top)
    if extra is None:
        return None
    return MissingExtraError(f"this needs {top}, from the '{extra}' extra: {install_hint(extra)}")
