"""HTTP-level defences of the server, as plain ASGI middleware: a request id on every response and
in the access log, and a Host allow-list against DNS rebinding.

- `RequestId`: every response carries `X-Request-ID`: the client's own when it is a sane token (1-128
  characters of `A-Z a-z 0-9 . _ : -`, so it cannot forge log lines), else a new random one. The id is
  in a context variable while the request runs, which `RequestIdFilter` puts into uvicorn's access
  log. It also answers a request whose handler raised with a JSON 500 carrying the id, which
  Starlette's outermost error handler would answer in plain text without it.
- `AllowedHosts`: a request whose Host header names a host the operator did not list is refused,
  400 JSON. A web page an attacker serves can point its own DNS name at this server's address
  (127.0.0.1 included) and read the answers as its own origin; its requests then carry the
  attacker's name as Host. Patterns follow Starlette's TrustedHostMiddleware: `example.com`,
  `*.example.com` (its subdomains), `*` (any host). IP literals and `localhost` are always accepted:
  no DNS name, nothing to rebind.
"""

from __future__ import annotations

import contextvars
import ipaddress
import json
import logging
import re
import uuid
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["AllowedHosts", "RequestId", "RequestIdFilter", "request_id"]

log = logging.getLogger("flexmerge.serve")

REQUEST_ID_HEADER = "x-request-id"
_SANE_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
_REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("flexmerge_request_id", default="-")


def request_id() -> str:
    """The id of the request being served ("-" outside a request)."""
    return _REQUEST_ID.get()


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every record (uvicorn's access log names it in its format)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _REQUEST_ID.get()
        return True


async def _send_json(send: Callable, status: int, detail: str, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestId:
    """ASGI middleware: `X-Request-ID` on every response (see the module's docstring)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.encode())
        rid = given.decode() if given is not None and _SANE_ID.fullmatch(given) else uuid.uuid4().hex
        header = (REQUEST_ID_HEADER.encode(), rid.encode())
        started = False

        async def send_with_id(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        token = _REQUEST_ID.set(rid)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s failed", rid)
            if not started:
                await _send_json(send, 500, f"internal server error (request id {rid})", [header])
        finally:
            _REQUEST_ID.reset(token)


def host_of(header: str) -> str:
    """The host of a Host header, lower-cased, without its port: `[::1]:8000` -> `[::1]`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[:header.find("]") + 1] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
    except ValueError:
        return False
    return True


def host_allowed(host: str, patterns: Sequence[str]) -> bool:
    """Whether `host` (from `host_of`) is served: an IP literal, localhost, or a pattern's match."""
    if not host or _is_ip_literal(host) or host == "localhost":
        return True
    for pattern in patterns:
        pattern = pattern.lower()
        if pattern == "*" or host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
    return False


class AllowedHosts:
    """ASGI middleware: 400 for a Host header naming a host outside `patterns` (see the module)."""

    def __init__(self, app: Any, patterns: Sequence[str]):
        self.app = app
        self.patterns = list(patterns)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            raw = dict(scope.get("headers") or []).get(b"host", b"")
            host = host_of(raw.decode("latin-1"))
            if not host_allowed(host, self.patterns):
                shown = host if len(host) <= 64 else host[:64] + "..."
                await _send_json(send, 400, f"Host {shown!r} is not served here (the server's --allowed-host "
                                            "list)")
                return
        await self.app(scope, receive, send)
