"""The server's flags, checked before anything is loaded: a bad flag or a busy port fails in one
line at once, not after the model loads (or never, as an infinite batch wait would: a lone request
would wait forever while /health said 200). No FastAPI here: the CLI checks these first."""

from __future__ import annotations

import math
import re
import resource
import socket
from collections.abc import Sequence

from flexmerge.errors import ConfigError

# The longest a request may wait for others to share its forward pass: beyond this, waiting costs
# more latency than batching saves on any model flexmerge serves.
MAX_BATCH_WAIT_MS = 10_000.0
# Upper bounds of the per-request and per-pass limits: far above useful settings. Together, inputs x
# characters, they must also keep the body limit they imply within MAX_BODY_BYTES.
MAX_INPUTS = 4096
MAX_CHARS = 100_000
MAX_BATCH = 4096
MAX_GRACE_S = 600.0  # a stop that waits longer than ten minutes is no longer graceful
#: JSON may spell one character in up to 12 bytes (a \uXXXX\uXXXX surrogate pair); the body
#: limit allows that for every permitted character, plus room for the envelope.
BYTES_PER_CHAR = 12
ENVELOPE_BYTES = 64 * 1024
MAX_BODY_BYTES = 256 << 20  # the largest body limit --max-inputs x --max-chars may imply

# Connections (flexmerge.serve.protocol): open at once, and how long a request may take to arrive.
DEFAULT_MAX_CONNECTIONS = 1000
MAX_CONNECTIONS = 100_000
#: descriptors kept free of connections: the server's own (7 when idle) and the connections one
#: turn of the accept loop takes before the cap sees them
DESCRIPTOR_RESERVE = 64
DEFAULT_REQUEST_TIMEOUT_S = 15.0
MAX_REQUEST_TIMEOUT_S = 600.0
_HOST_PATTERN = re.compile(r"(\*|(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?|\[[0-9A-Fa-f:.]+\])")
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
    if body_limit(max_inputs, max_chars) > MAX_BODY_BYTES:
        raise ConfigError(f"--max-inputs {max_inputs} x --max-chars {max_chars} admits request bodies of "
                          f"{body_limit(max_inputs, max_chars) / (1 << 20):.0f} MiB; at most {MAX_BODY_BYTES >> 20} "
                          "MiB: lower one of them")


def body_limit(max_inputs: int, max_chars: int) -> int:
    """The most bytes a request body may have: every permitted character at its longest in JSON."""
    return max_inputs * (max_chars * BYTES_PER_CHAR + 8) + ENVELOPE_BYTES


def check_connections(max_connections: int | None, request_timeout_s: float) -> int:
    """The connection cap this process can hold (`max_connections`, or by default 1000 or what the
    descriptor limit leaves room for) and a finite request timeout. The soft descriptor limit is
    raised toward the hard one when the cap needs it; a cap the hard limit cannot hold is an error."""
    timeout = float(request_timeout_s)
    if not math.isfinite(timeout) or not 0 < timeout <= MAX_REQUEST_TIMEOUT_S:
        raise ConfigError(f"--request-timeout-s must be above 0 and at most {MAX_REQUEST_TIMEOUT_S:g} seconds, "
                          f"got {request_timeout_s!r}")
    wanted = DEFAULT_MAX_CONNECTIONS if max_connections is None else max_connections
    if isinstance(wanted, bool) or not isinstance(wanted, int) or not 1 <= wanted <= MAX_CONNECTIONS:
        raise ConfigError(f"--max-connections must be a whole number from 1 to {MAX_CONNECTIONS}, got {wanted!r}")
    room = _descriptors_for(wanted + DESCRIPTOR_RESERVE) - DESCRIPTOR_RESERVE
    if wanted <= room:
        return wanted
    if max_connections is None and room >= 1:
        return room  # the default shrinks to fit `ulimit -n`
    raise ConfigError(f"--max-connections {wanted} needs {wanted + DESCRIPTOR_RESERVE} file descriptors, and this "
                      f"process may open {room + DESCRIPTOR_RESERVE} (ulimit -n); lower --max-connections or "
                      "raise the limit")


def _descriptors_for(needed: int) -> int:
    """How many descriptors this process may open, once its soft limit is raised toward `needed`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return needed
    if soft < needed and (hard == resource.RLIM_INFINITY or hard > soft):
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def allowed_hosts(given: Sequence[str], host: str) -> list[str]:
    """The Host patterns a server listening on `host` accepts (IP literals and localhost always are):
    the operator's `--allowed-host` list, checked; by default the name it listens on, if a name,
    and this machine's own names. A foreign name (DNS rebinding) is refused either way."""
    if given:
        check_allowed_hosts(given)
        return list(given)
    names = [host, socket.gethostname(), socket.getfqdn()]
    return sorted({n.lower() for n in names if n and _HOST_PATTERN.fullmatch(n) and n != "*"})


def check_allowed_hosts(patterns: Sequence[str]) -> None:
    """Host patterns as Starlette's TrustedHostMiddleware takes them: a name or address, `*.name`
    (its subdomains), or `*` (any host)."""
    for pattern in patterns:
        if not isinstance(pattern, str) or len(pattern) > 253 or not _HOST_PATTERN.fullmatch(pattern):
            raise ConfigError(f"--allowed-host {pattern!r}: expected a host name or address (example.com, "
                              "10.0.0.5, [::1]), *.example.com for its subdomains, or * for any host")


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
