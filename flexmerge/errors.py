"""Error types. Every message names the offending value and, where there is one, the file and key."""

from __future__ import annotations

from collections.abc import Iterable


class FlexMergeError(Exception):
    """Base class of every error flexmerge raises on purpose."""


class FlexMergeWarning(UserWarning):
    """Something the user may not have meant, done anyway: the CLI prints it as one `note:` line."""


class CheckpointError(FlexMergeError):
    """A checkpoint cannot be read, or disagrees with the others (keys, shapes, dtypes, values)."""


class ConfigError(FlexMergeError):
    """An option or a combination of options is invalid."""


class ArtifactError(FlexMergeError):
    """A saved flex model is missing, truncated, corrupted or of an unknown format."""


class SizeError(FlexMergeError):
    """A requested size cannot be reached with the chosen method."""


class UnknownNameError(ConfigError):
    """A name (method, planner, granularity, ...) is not one of the registered choices."""

    def __init__(self, kind: str, name: str, choices: Iterable[str]):
        self.choices = sorted(choices)
        super().__init__(f"unknown {kind} {name!r}; choose one of: {', '.join(self.choices)}")
