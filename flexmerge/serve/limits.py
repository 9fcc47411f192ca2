"""The server's flags, checked before anything is loaded: a bad flag or a busy port fails in one
line at once, not after the model loads (or never, as an infinite batch wait would: a lone request
would wait forever while /health said 200). No FastAPI here: the CLI checks these first."""

from __future__ import annotations

import math
import socket

from flexmerge.errors import ConfigError

# The longest a request may wait for others to share its forward pass: beyond this, waiting costs
# more latency than batching saves on any model flexmerge serves.
MAX_BATCH_WAIT_MS = 10_000.0
# Upper bounds of the per-request and per-pass limits: far above useful settings, low enough that
# the body limit they imply (inputs x characters) stays within a few hundred MB.
MAX_INPUTS = 4096
MAX_CHARS = 100_000
MAX_BATCH = 4096
MAX_GRACE_S = 600.0  # a stop that waits longer than ten minutes is no longer graceful
MAX_NEW_TOKENS = 1_000_000  # the upper bound of --max-tokens: beyond any model's context
DEFAULT_MAX_TOKENS = 1024  # --max-tokens: the most tokens one request generates, unless raised


def check_grace(grace_s: float) -> None:
    """The shutdown grace period: finite, above zero, at most MAX_GRACE_S seconds."""
    if not math.isfinite(float(grace_s)) or not 0 < float(grace_s) <= MAX_GRACE_S:
        raise ConfigError(f"--grace-s must be above 0 and at most {MAX_GRACE_S:g} seconds, got {grace_s!r}")


def check_max_tokens(max_tokens: int) -> None:
    """The most tokens one request may generate: a whole number from 1 to MAX_NEW_TOKENS."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_NEW_TOKENS:
        raise ConfigError(f"--max-tokens must be a whole number from 1 to {MAX_NEW_TOKENS}, got {max_tokens!r}")


def check_api_key(key: str | None) -> None:
    """An API key, when given, is a non-empty printable ASCII string (it travels in an HTTP header)."""
    if key is not None and not (key and key.isascii() and key.isprintable() and key == key.strip()):
        raise ConfigError("--api-key (or FLEXMERGE_API_KEY) must be a non-empty string of printable ASCII "
                          "characters without surrounding spaces")


def check_limits(*, max_inputs: int, max_chars: int, max_batch: int, batch_wait_ms: float) -> None:
    """Each limit a finite number within its bounds; the error names the flag and the bounds."""
    for flag, value, most in (("--max-inputs", max_inputs, MAX_INPUTS), ("--max-chars", max_chars, MAX_CHARS),
                              ("--max-batch", max_batch, MAX_BATCH)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
            raise ConfigError(f"{flag} must be a whole number from 1 to {most}, got {value!r}")
    wait = float(batch_wait_ms)
    if not math.isfinite(wait) or not 0 <= wait <= MAX_BATCH_WAIT_MS:
        raise ConfigError(f"--batch-wait-ms must be from 0 to {MAX_BATCH_WAIT_MS:g} milliseconds, got {batch_wait_ms!r}")


def check_listen(host: str, port: int) -> None:
    """That the server can listen on host:port, tried now (as uvicorn binds: SO_REUSEADDR set)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"--port must be from 1 to 65535, got {port!r}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host!r}: not an address of this machine ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e} (another server on that port? "
                              "choose another with --port)") from None
