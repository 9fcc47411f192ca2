"""Connection-level defences of the HTTP server, below FastAPI: a request deadline, a connection cap
and rate-limited logging of what they refuse.

uvicorn (0.55, h11) closes a connection idle between requests after its keep-alive timeout, but a
connection that never finishes its request line and headers, or trickles its body, is held forever,
and it has no connection cap: a client that opens more connections than the process may hold file
descriptors shuts every other client out, and asyncio then logs a traceback per failed accept, tens
of thousands a second (issue 30). `ConnectionGuard.protocol()` is uvicorn's h11 protocol with:

- a deadline per request: its line, headers and body must all arrive within `request_timeout_s` of
  its first byte (of the connection's opening for the first request); else 408 and close;
- a cap of `max_connections` open connections: a connection beyond it evicts the oldest connections
  whose request has not fully arrived (idle or slow ones; a client that sends its request at once is
  never the oldest), down to 90% of the cap, and is refused (503, closed) only when every other
  connection has a complete request in the works. So idle connections, however many, cannot shut out a client that
  sends a request, and with the cap below the descriptor limit, accepts rarely fail;
- a summary line, at most one per `report_every_s`, of what was evicted, refused or timed out, and
  of failed accepts, in place of a line (or a traceback) each.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import uuid
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["ConnectionGuard"]

log = logging.getLogger("flexmerge.serve")

#: asyncio's message when accept() fails for want of descriptors or memory (selector_events.py)
_ACCEPT_FAILED = "socket.accept() out of system resource"
_REQUEST_UNDER_WAY = (h11.IDLE, h11.SEND_BODY)  # the client's side of a request not fully arrived


def raw_response(status: int, detail: str) -> bytes:
    """A complete HTTP/1.1 JSON error response that closes the connection, written below h11 (the
    request it answers never reached the app, so h11 has no response to send)."""
    body = json.dumps({"detail": detail}).encode()
    reason = {408: "Request Timeout", 503: "Service Unavailable"}[status]
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\nx-request-id: {uuid.uuid4().hex}\r\n\r\n")
    return head.encode() + body


class ConnectionGuard:
    """The connection cap, the request deadline and their log, shared by the connections of one
    server; `protocol()` is the uvicorn protocol class that applies them."""

    def __init__(self, max_connections: int, request_timeout_s: float, report_every_s: float = 10.0):
        self.max_connections = max_connections
        # evictions go down to 90% of the cap: the accept loop takes a burst of connections at once
        # (up to its backlog) before any is counted, and they need free descriptors
        self.low_mark = max(1, max_connections - max(1, max_connections // 10))
        self.request_timeout_s = request_timeout_s
        self.report_every_s = report_every_s
        self.open: set[GuardedH11Protocol] = set()  # connections not yet closing
        # connections whose request has not fully arrived, oldest first: the ones a newcomer evicts
        self.unfinished: collections.OrderedDict[GuardedH11Protocol, None] = collections.OrderedDict()
        self.counts: collections.Counter[str] = collections.Counter()
        self.accept_error = ""
        self._last_report = -math.inf
        self._report_due: asyncio.TimerHandle | None = None

    def protocol(self) -> type[H11Protocol]:
        """uvicorn's h11 protocol, bound to this guard (pass it as uvicorn.Config(http=...))."""
        return type("GuardedH11", (GuardedH11Protocol,), {"guard": self})

    # ------------------------------------------------------------------ admission and eviction

    def admit(self, conn: GuardedH11Protocol) -> bool:
        """Count `conn` in. Beyond the cap, evict the oldest unfinished connections down to the low
        mark (room for the next burst of accepts), or refuse `conn` when none is left to evict."""
        self.open.add(conn)
        self.unfinished[conn] = None
        if len(self.open) <= self.max_connections:
            return True
        while len(self.open) > self.low_mark:
            victim = next(iter(self.unfinished))
            if victim is conn:  # every other connection has a request in the works
                break
            self.unfinished.pop(victim)
            if victim.request_under_way():
                self.note("evicted")
                victim.close_with(503, "the server is at its connection limit (--max-connections) and closed "
                                       "this connection, whose request had not arrived; retry")
        if len(self.open) > self.max_connections:
            self.note("refused")
            conn.close_with(503, "the server is at its connection limit (--max-connections); retry later",
                            always=True)
            return False
        return True

    def request_arrived(self, conn: GuardedH11Protocol) -> None:
        self.unfinished.pop(conn, None)

    def waiting_again(self, conn: GuardedH11Protocol) -> None:
        """`conn` answered its request and waits for the next one: evictable again, as the newest."""
        if conn in self.open:
            self.unfinished[conn] = None
            self.unfinished.move_to_end(conn)

    def forget(self, conn: GuardedH11Protocol) -> None:
        self.open.discard(conn)
        self.unfinished.pop(conn, None)

    # ------------------------------------------------------------------ the rate-limited log

    def note(self, what: str, count: int = 1) -> None:
        """Count an event; a summary line follows at most `report_every_s` after the last one."""
        self.counts[what] += count
        if self._report_due is None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, self._last_report + self.report_every_s - loop.time())
            self._report_due = loop.call_later(delay, self.report)

    def report(self) -> None:
        self._report_due = None
        self._last_report = asyncio.get_running_loop().time()
        if not self.counts:
            return
        c, parts = self.counts, []
        if c["evicted"]:
            parts.append(f"{c['evicted']} unfinished connections closed to admit newer ones "
                         f"(--max-connections {self.max_connections})")
        if c["refused"]:
            parts.append(f"{c['refused']} connections refused, every one of the {self.max_connections} "
                         "open ones busy with a request (--max-connections)")
        if c["timed_out"]:
            parts.append(f"{c['timed_out']} connections closed whose request did not arrive within "
                         f"{self.request_timeout_s:g} s (--request-timeout-s)")
        if c["accept_failed"]:
            # asyncio retries a failed accept up to its backlog at once: attempts, not connections
            parts.append(f"{c['accept_failed']} attempts to accept a connection failed ({self.accept_error}; "
                         "raise `ulimit -n` or lower --max-connections)")
        log.warning("connection guard: %s", "; ".join(parts))
        self.counts.clear()

    def loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """The event loop's exception handler: failed accepts are counted into the summary line
        (asyncio logs a traceback for each, and retries up to its backlog at once); the rest goes
        to asyncio's default handler."""
        if context.get("message") == _ACCEPT_FAILED:
            exc = context.get("exception")
            self.accept_error = getattr(exc, "strerror", None) or str(exc)
            self.note("accept_failed")
        else:
            loop.default_exception_handler(context)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol under a `ConnectionGuard` (see the module's docstring)."""

    guard: ConnectionGuard
    _deadline: asyncio.TimerHandle | None = None  # when the request under way must have arrived
    _bytes_seen = False  # of the request under way

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.guard.admit(self):
            self._start_clock()

    def data_received(self, data: bytes) -> None:
        self._bytes_seen = True
        if self._deadline is None:  # the first byte of a request on a kept-alive connection
            self._start_clock()
        super().data_received(data)
        if not self.request_under_way():
            self._stop_clock()
            self.guard.request_arrived(self)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request at once
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._bytes_seen = bool(self.conn.trailing_data[0])
            self.guard.waiting_again(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_clock()
        self.guard.forget(self)
        super().connection_lost(exc)

    def request_under_way(self) -> bool:
        """Whether the current request (or the connection's first) has not fully arrived yet."""
        return self.conn.their_state in _REQUEST_UNDER_WAY

    def close_with(self, status: int, detail: str, always: bool = False) -> None:
        """Close now; a client that has sent part of a request (or, with `always`, a newcomer that
        is about to) is told why (`status`) first, when no response of the app has begun."""
        self._stop_clock()
        self.guard.forget(self)
        if self.transport.is_closing():
            return
        if always or self._may_answer():
            self.transport.write(raw_response(status, detail))
        self.transport.close()

    def _may_answer(self) -> bool:
        """Whether the client sent part of a request that no response has begun to answer."""
        if not self._bytes_seen:
            return False
        if self.conn.their_state is h11.IDLE:  # request line or headers under way: no cycle of its own yet
            return True
        return self.cycle is not None and not self.cycle.response_started

    def _start_clock(self) -> None:
        self._deadline = self.loop.call_later(self.guard.request_timeout_s, self._timed_out)

    def _stop_clock(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or not self.request_under_way():
            return
        self.guard.note("timed_out")
        self.close_with(408, f"the request did not arrive within {self.guard.request_timeout_s:g} s")
