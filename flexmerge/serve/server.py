"""The HTTP JSON server of the multi-task runtime: FastAPI on uvicorn.

One process serves every task of one flex-model artifact. Concurrent requests, for any mix of
tasks, are pooled by a dynamic batcher (`flexmerge.serve.batcher`) into shared forward passes
(`Runtime.predict_mixed`), which run one at a time in a worker thread: the event loop keeps
accepting requests and answering /health while the model computes, and the model is never entered
by two threads at once.

This module builds the app (`create_app`: limits, body-size middleware, the optional API key,
error format, the batcher's and the decoder's lifespan) and runs it (`run_server`); the endpoints
are the API routers of `flexmerge.serve.api`: GET /health, GET /tasks, POST
/v1/tasks/{task}/predict with {"inputs": [...]}, and the OpenAI API for causal LMs (/v1/models,
/v1/completions, /v1/chat/completions), whose requests decode together in a decode loop
(`flexmerge.serve.decoder`). Errors are JSON {"detail": "..."} naming the problem (on the OpenAI
routes, OpenAI's {"error": {...}}): 401 no or a wrong API key, 404 unknown task, 413 over a limit,
422 malformed body, 500 a failed prediction (the server keeps running), 503 shutting down.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from flexmerge.serve.api import health, openai as openai_api, tasks as tasks_api
from flexmerge.serve.api.tasks import RuntimeLike
from flexmerge.serve.auth import APIKey
from flexmerge.serve.batcher import Batcher, running_batcher
from flexmerge.serve.decoder import DecodeLoop, running_decoder
from flexmerge.serve.limits import (DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_TOKENS, DEFAULT_REQUEST_TIMEOUT_S, body_limit,
                                    check_allowed_hosts, check_api_key, check_limits, check_max_tokens)
from flexmerge.serve.middleware import AllowedHosts, RequestId, RequestIdFilter
from flexmerge.serve.protocol import ConnectionGuard

__all__ = ["create_app", "run_server"]

MAX_ERRORS_SHOWN = 5  # errors a 422 names and lists: the first few, then how many more
log = logging.getLogger("flexmerge.serve")

#: Seconds uvicorn waits for open requests after SIGTERM/SIGINT before cancelling them.
GRACEFUL_TIMEOUT_S = 10
SHUTDOWN_RUN_FRACTION = 0.8  # of the grace period, spent running queued work; the rest answers 503s
KEEP_ALIVE_S = 5  # uvicorn's default: a connection idle this long between requests is closed


# --------------------------------------------------------------------------------------- the app


class _BodyLimit:
    """ASGI middleware refusing bodies over `limit` bytes with 413 before they are parsed: the
    JSON parser would otherwise hold the whole body, however large, in memory."""

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, scope: dict, receive: Callable, send: Callable) -> None:
        detail = f"request body too large: more than {self.limit} bytes (see --max-inputs and --max-chars)"
        await JSONResponse(_error_body(scope["path"], detail), status_code=413)(scope, receive, send)


def _error_body(path: str, message: str) -> dict[str, Any]:
    """An error answered before any route runs (body limit, API key), in the format of the API
    family that owns `path`: OpenAI's {"error": {...}} on its routes, {"detail": ...} elsewhere."""
    return openai_api.error_body(message) if openai_api.owns(path) else {"detail": message}


def _replay(body: bytes, receive: Callable) -> Callable:
    """A `receive` that hands the app the already-read body, then defers to the real one."""
    sent = False

    async def replayed() -> dict:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
    return replayed


def _where(loc: Sequence[Any]) -> str:
    """('body', 'inputs', 0) -> 'inputs[0]'."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _validation_message(request: Request, errors: Sequence[dict[str, Any]], shown: int = MAX_ERRORS_SHOWN) -> str:
    """One readable sentence for a 422, naming what is wrong and where (the first few problems)."""
    parts = []
    for e in errors[:shown]:
        kind, loc = e.get("type", ""), tuple(e.get("loc", ()))
        if kind == "json_invalid":
            where = f" at character {loc[1]}" if len(loc) > 1 else ""
            parts.append(f"the body is not valid JSON ({e.get('ctx', {}).get('error', 'decode error')}{where})")
        elif kind == "missing" and loc == ("body",):
            parts.append('the body is missing: send {"inputs": ["text", ...]}')
        elif loc == ("body",) and kind not in ("value_error", "unknown_fields"):
            sent_json = "json" in request.headers.get("content-type", "")
            parts.append('the body must be a JSON object {"inputs": ["text", ...]}'
                         + ("" if sent_json else " sent with Content-Type: application/json"))
        else:
            msg = e.get("msg", kind)
            msg = msg.removeprefix("Value error, ") if kind == "value_error" else msg  # pydantic's prefix
            parts.append(f"{_where(loc) or 'body'}: {msg}")
    more = f"; and {len(errors) - shown} more" if len(errors) > shown else ""
    return "invalid request: " + "; ".join(parts) + more


def create_app(runtime: RuntimeLike, *, max_inputs: int = 64, max_chars: int = 2000, max_batch: int = 32,
               batch_wait_ms: float = 5.0, allowed_hosts: Sequence[str] | None = None,
               max_tokens: int = DEFAULT_MAX_TOKENS, api_key: str | None = None, join: str = "continuous") -> FastAPI:
    """The FastAPI app serving `runtime`: per-request limits `max_inputs` inputs of at most
    `max_chars` characters (and at most `max_tokens` generated tokens); forward passes of at most
    `max_batch` inputs (or sequences decoding together), gathered for at most `batch_wait_ms`
    milliseconds; Host headers limited to `allowed_hosts` (patterns of
    `flexmerge.serve.middleware.AllowedHosts`; None: any). With `api_key`, every request but
    /health needs `Authorization: Bearer <key>`. `join`: how sequences join a generating batch
    ("continuous" or "static", see `flexmerge.runtime.generation`). The batcher and the decode loop
    live in the app's lifespan: they start with the server and, on shutdown, finish the pass in
    flight before they stop. Every response carries an X-Request-ID. No /docs or /redoc (their
    pages load scripts from public CDNs); the schema is at /openapi.json."""
    check_limits(max_inputs=max_inputs, max_chars=max_chars, max_batch=max_batch, batch_wait_ms=batch_wait_ms)
    check_max_tokens(max_tokens)
    check_api_key(api_key)
    if allowed_hosts is not None:
        check_allowed_hosts(allowed_hosts)
    tasks = list(runtime.tasks)
    infos = [runtime.task_info(t) for t in tasks]
    generating = any(i["kind"] == "text-generation" for i in infos)
    routers = [health.router(len(tasks)), tasks_api.router(runtime, max_inputs=max_inputs, max_chars=max_chars),
               openai_api.router(runtime, infos, max_inputs=max_inputs, max_chars=max_chars, max_tokens=max_tokens)]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.batcher = Batcher(runtime.predict_mixed, max_batch=max_batch, wait_s=batch_wait_ms / 1000)
        app.state.batcher.start()
        app.state.decoder = None
        if generating:
            generator = runtime.generator(max_batch=max_batch, join=join)  # type: ignore[attr-defined]
            app.state.decoder = DecodeLoop(generator, wait_s=batch_wait_ms / 1000)
            app.state.decoder.start()
        log.info("serving %d tasks (%s), size %.4gx", len(tasks), ", ".join(tasks), runtime.size)
        try:
            yield
        finally:
            await app.state.batcher.close()
            log.info("batcher stopped after %d batches", app.state.batcher.batches)
            if app.state.decoder is not None:
                await app.state.decoder.close()
                log.info("decoder stopped after %d steps", app.state.decoder.steps)

    app = FastAPI(title="flexmerge", summary="multi-task inference on one flex-model artifact", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.add_middleware(_BodyLimit, limit=body_limit(max_inputs, max_chars))
    if api_key is not None:  # runs before the body limit: no body is read for a request without the key
        app.add_middleware(APIKey, key=api_key, error_body=_error_body)
    if allowed_hosts is not None:
        app.add_middleware(AllowedHosts, patterns=allowed_hosts)
    app.add_middleware(RequestId)  # added last: the outermost, so every answer above carries the id

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        # the first few errors, without an echo of the input: a body of a million bad values
        # must not get a million-entry answer
        brief = [{k: e[k] for k in ("type", "loc", "msg") if k in e} for e in errors[:MAX_ERRORS_SHOWN]]
        return JSONResponse({"detail": _validation_message(request, errors), "errors": brief}, status_code=422)

    for api in routers:
        app.include_router(api)
    return app


# --------------------------------------------------------------------------------------- running


def _bounded_shutdown_server():
    """uvicorn's Server, told at the stop signal to run no batch past most of the grace period, with
    the connection guard's handler of failed accepts on its event loop."""
    import uvicorn

    class BoundedShutdown(uvicorn.Server):
        def __init__(self, config: uvicorn.Config, app: FastAPI, grace_s: float, guard: ConnectionGuard):
            super().__init__(config)
            self.app, self.grace_s, self.guard = app, grace_s, guard

        async def startup(self, sockets: Any = None) -> None:
            asyncio.get_running_loop().set_exception_handler(self.guard.loop_exception)
            await super().startup(sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit:
                # what is still queued at 80% of the grace period gets a 503, inside the period
                deadline = asyncio.get_running_loop().time() + SHUTDOWN_RUN_FRACTION * self.grace_s
                for loop in (running_batcher(self.app.state), running_decoder(self.app.state)):
                    if loop is not None:
                        loop.stop_by(deadline)
            super().handle_exit(sig, frame)

    return BoundedShutdown


def _log_config(log_level: str) -> dict[str, Any]:
    """uvicorn's logging, with our log lines next to its own and the request id in its access log."""
    import uvicorn

    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["flexmerge.serve"] = {"handlers": ["default"], "level": log_level.upper(), "propagate": False}
    config.setdefault("filters", {})["request_id"] = {"()": RequestIdFilter}
    config["handlers"]["access"]["filters"] = ["request_id"]
    config["formatters"]["access"]["fmt"] += " %(request_id)s"
    return config


def run_server(app: FastAPI, host: str, port: int, *, log_level: str = "info",
               grace_s: float = GRACEFUL_TIMEOUT_S, max_connections: int = DEFAULT_MAX_CONNECTIONS,
               request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S) -> None:
    """Serve `app` with uvicorn until SIGTERM or Ctrl-C, then shut down gracefully and return.

    At most `max_connections` are open at once, and a request must arrive within
    `request_timeout_s` of its first byte (`flexmerge.serve.protocol`); `max_connections` must fit
    the process's descriptor limit (`flexmerge.serve.limits.check_connections` says how many do).

    uvicorn re-raises the signal that stopped it once it has shut down, which would kill the
    process with that signal (SIGTERM: status -15) after a clean stop. A no-op handler, installed
    for the duration, turns that into a normal return: exit status 0 means "stopped cleanly".
    """
    import uvicorn

    stopped: list[int] = []
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: stopped.append(signum))
    guard = ConnectionGuard(max_connections, request_timeout_s)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, log_config=_log_config(log_level),
                            timeout_graceful_shutdown=grace_s, http=guard.protocol(), timeout_keep_alive=KEEP_ALIVE_S)
    try:
        _bounded_shutdown_server()(config, app, grace_s, guard).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped:
        log.info("stopped by %s", signal.Signals(stopped[0]).name)
