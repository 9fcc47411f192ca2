"""The HTTP JSON server of the multi-task runtime: FastAPI on uvicorn.

One process serves every task of one flex-model artifact. Concurrent requests, for any mix of
tasks, are pooled by a dynamic batcher into shared forward passes (`Runtime.predict_mixed`), which
run one at a time in a worker thread: the event loop keeps accepting requests and answering
/health while the model computes, and the model is never entered by two threads at once.

Endpoints: GET /health, GET /tasks, POST /v1/tasks/{task}/predict with {"inputs": [...]}.
Errors are JSON {"detail": "..."} naming the problem: 404 unknown task, 413 over a limit,
422 malformed body, 500 a failed prediction (the server keeps running), 503 shutting down.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import signal
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from flexmerge.errors import ConfigError, FlexMergeError

__all__ = ["create_app", "run_server", "Batcher", "ShuttingDown", "PredictRequest"]

log = logging.getLogger("flexmerge.serve")

#: Seconds uvicorn waits for open requests after SIGTERM/SIGINT before cancelling them.
GRACEFUL_TIMEOUT_S = 10
#: JSON may spell one character in up to 12 bytes (a \uXXXX\uXXXX surrogate pair); the body
#: limit allows that for every permitted character, plus room for the envelope.
_BYTES_PER_CHAR = 12
_ENVELOPE_BYTES = 64 * 1024


class RuntimeLike(Protocol):
    """What the server needs of `flexmerge.serve.Runtime` (a fake one serves in unit tests)."""

    tasks: list[str]
    size: float

    def task_info(self, task: str) -> dict[str, Any]: ...

    def predict_mixed(self, items: list[tuple[str, str]]) -> list[dict[str, Any]]: ...


class PredictRequest(BaseModel):
    """The body of POST /v1/tasks/{task}/predict. Unknown fields are refused so that a typo
    (`"input"`) is an error and not an empty request."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[StrictStr] = Field(min_length=1, description="texts to run through the task's model")


class ShuttingDown(Exception):
    """The server is stopping; the request was not (completely) run."""


# --------------------------------------------------------------------------------------- batching


@dataclass(eq=False)
class _Job:
    """One request's inputs; `taken` of them have been handed to batches so far. A request larger
    than max_batch spans several batches, its outputs accumulating in order."""

    task: str
    inputs: list[str]
    future: asyncio.Future
    arrived: float
    taken: int = 0
    outputs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def waiting(self) -> int:
        return len(self.inputs) - self.taken


_Slice = tuple[_Job, int, int]  # a job and the [lo, hi) range of its inputs in one batch


class Batcher:
    """Pools requests into batches of at most `max_batch` inputs, across tasks, in arrival order.

    A batch starts when it is full or when its oldest request has waited `wait_s`, whichever is
    first: an idle server answers a lone request after `wait_s`, a busy one fills every pass.
    Batches run one at a time in a worker thread. When a batch fails, its requests are retried
    one by one, so that one bad request fails alone.
    """

    def __init__(self, predict_mixed: Callable[[list[tuple[str, str]]], list[dict[str, Any]]], *,
                 max_batch: int, wait_s: float):
        self._predict_mixed = predict_mixed
        self._max_batch = max_batch
        self._wait_s = wait_s
        self._jobs: deque[_Job] = deque()
        self._arrived = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        self.batches = 0  # forward passes run (logged at shutdown)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and not self._closing

    def start(self) -> None:
        """Start the batching loop on the running event loop (the app's lifespan calls this)."""
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="flexmerge-batcher")

    async def close(self) -> None:
        """Stop taking requests, let the batch in flight finish, then fail what is left with
        ShuttingDown (503): a stopping server answers every request it accepted."""
        self._closing = True
        self._arrived.set()
        if self._task is not None:
            await self._task

    async def submit(self, task: str, inputs: Sequence[str]) -> list[dict[str, Any]]:
        """Queue one request and wait for its outputs (in input order)."""
        if not self.running:
            raise ShuttingDown()
        loop = asyncio.get_running_loop()
        job = _Job(task, list(inputs), loop.create_future(), loop.time())
        self._jobs.append(job)
        self._arrived.set()
        return await job.future

    async def _loop(self) -> None:
        try:
            while (batch := await self._next_batch()) is not None:
                if batch:
                    await self._run(batch)
        finally:
            self._closing = True
            self._fail_left(ShuttingDown())

    async def _next_batch(self) -> list[_Slice] | None:
        """Wait for work and then for the batching window; None once closing."""
        loop = asyncio.get_running_loop()
        while not self._closing and not self._prune():
            await self._wait(None)
        while not self._closing and self._prune() < self._max_batch:
            left = self._jobs[0].arrived + self._wait_s - loop.time()
            if left <= 0:
                break
            await self._wait(left)
        return None if self._closing else self._take()

    async def _wait(self, timeout: float | None) -> None:
        """Sleep until a request arrives (or close() is called), at most `timeout` seconds."""
        self._arrived.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._arrived.wait(), timeout)

    def _prune(self) -> int:
        """Drop requests already answered (cancelled by a gone client, or failed); return the
        number of inputs still waiting."""
        self._jobs = deque(j for j in self._jobs if not j.future.done())
        return sum(j.waiting for j in self._jobs)

    def _take(self) -> list[_Slice]:
        batch: list[_Slice] = []
        room = self._max_batch
        for job in self._jobs:
            if room == 0:
                break
            n = min(job.waiting, room)
            if n:
                batch.append((job, job.taken, job.taken + n))
                job.taken += n
                room -= n
        while self._jobs and self._jobs[0].waiting == 0:  # fully handed out: nothing left to queue
            self._jobs.popleft()
        return batch

    async def _run(self, batch: list[_Slice]) -> None:
        items = [(job.task, text) for job, lo, hi in batch for text in job.inputs[lo:hi]]
        try:
            outputs = await asyncio.to_thread(self._predict_mixed, items)
            if len(outputs) != len(items):
                raise RuntimeError(f"predict_mixed returned {len(outputs)} outputs for {len(items)} inputs")
        except Exception as e:
            if len(batch) > 1:
                log.warning("a batch of %d requests failed (%s); retrying them one by one", len(batch), e)
                for one in batch:
                    await self._run([one])
            else:
                _settle(batch[0][0], error=e)
            return
        self.batches += 1
        log.debug("batch %d: %d inputs from %d requests", self.batches, len(items), len(batch))
        pos = 0
        for job, lo, hi in batch:
            job.outputs.extend(outputs[pos:pos + hi - lo])
            pos += hi - lo
            if len(job.outputs) == len(job.inputs):
                _settle(job, result=job.outputs)

    def _fail_left(self, error: Exception) -> None:
        for job in self._jobs:
            _settle(job, error=error)
        self._jobs.clear()


def _settle(job: _Job, *, result: Any = None, error: BaseException | None = None) -> None:
    """Answer a request unless it is already answered (its client may have gone away)."""
    if job.future.done():
        return
    if error is not None:
        job.future.set_exception(error)
    else:
        job.future.set_result(result)


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
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)


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


def _validation_message(request: Request, errors: Sequence[dict[str, Any]], shown: int = 5) -> str:
    """One readable sentence for a 422, naming what is wrong and where (the first few problems)."""
    parts = []
    for e in errors[:shown]:
        kind, loc = e.get("type", ""), tuple(e.get("loc", ()))
        if kind == "json_invalid":
            where = f" at character {loc[1]}" if len(loc) > 1 else ""
            parts.append(f"the body is not valid JSON ({e.get('ctx', {}).get('error', 'decode error')}{where})")
        elif kind == "missing" and loc == ("body",):
            parts.append('the body is missing: send {"inputs": ["text", ...]}')
        elif loc == ("body",):
            sent_json = "json" in request.headers.get("content-type", "")
            parts.append('the body must be a JSON object {"inputs": ["text", ...]}'
                         + ("" if sent_json else " sent with Content-Type: application/json"))
        else:
            parts.append(f"{_where(loc) or 'body'}: {e.get('msg', kind)}")
    more = f"; and {len(errors) - shown} more" if len(errors) > shown else ""
    return "invalid request: " + "; ".join(parts) + more


def _check_limits(inputs: list[str], max_inputs: int, max_chars: int) -> None:
    if len(inputs) > max_inputs:
        raise HTTPException(413, f"too many inputs: {len(inputs)}; this server takes at most {max_inputs} "
                                 "per request (--max-inputs)")
    for i, text in enumerate(inputs):
        if len(text) > max_chars:
            raise HTTPException(413, f"inputs[{i}] is {len(text)} characters long; this server takes at most "
                                     f"{max_chars} per input (--max-chars)")


def _unknown_task(task: str, tasks: Sequence[str]) -> str:
    return f"unknown task {task!r}; this model serves: {', '.join(tasks)}"


def create_app(runtime: RuntimeLike, *, max_inputs: int = 64, max_chars: int = 2000, max_batch: int = 32,
               batch_wait_ms: float = 5.0) -> FastAPI:
    """The FastAPI app serving `runtime`: per-request limits `max_inputs` inputs of at most
    `max_chars` characters; forward passes of at most `max_batch` inputs, gathered for at most
    `batch_wait_ms` milliseconds. The batcher lives in the app's lifespan: it starts with the
    server and, on shutdown, finishes the batch in flight before it stops."""
    for name, value in (("max_inputs", max_inputs), ("max_chars", max_chars), ("max_batch", max_batch)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if batch_wait_ms < 0:
        raise ConfigError(f"batch_wait_ms must be >= 0, got {batch_wait_ms}")
    tasks = list(runtime.tasks)
    infos = [runtime.task_info(t) for t in tasks]  # fixed for the artifact's lifetime: computed once

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.batcher = Batcher(runtime.predict_mixed, max_batch=max_batch, wait_s=batch_wait_ms / 1000)
        app.state.batcher.start()
        log.info("serving %d tasks (%s), size %.4gx", len(tasks), ", ".join(tasks), runtime.size)
        try:
            yield
        finally:
            await app.state.batcher.close()
            log.info("batcher stopped after %d batches", app.state.batcher.batches)

    app = FastAPI(title="flexmerge", summary="multi-task inference on one flex-model artifact", lifespan=lifespan)
    app.add_middleware(_BodyLimit, limit=max_inputs * (max_chars * _BYTES_PER_CHAR + 8) + _ENVELOPE_BYTES)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        brief = [{k: e[k] for k in ("type", "loc", "msg") if k in e} for e in errors]  # no echo of the input
        return JSONResponse({"detail": _validation_message(request, errors), "errors": brief}, status_code=422)

    def batcher_of(request: Request) -> Batcher | None:
        batcher = getattr(request.app.state, "batcher", None)
        return batcher if batcher is not None and batcher.running else None

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        """Liveness for load balancers: 503 once the server is stopping."""
        if batcher_of(request) is None:
            return JSONResponse({"status": "stopping", "tasks": len(tasks)}, status_code=503)
        return JSONResponse({"status": "ok", "tasks": len(tasks)})

    @app.get("/tasks")
    async def list_tasks() -> dict[str, Any]:
        return {"size": float(runtime.size), "tasks": infos}

    @app.post("/v1/tasks/{task}/predict")
    async def predict(task: str, body: PredictRequest, request: Request) -> JSONResponse:
        """Run `inputs` through `task`'s model: labels and scores, or embeddings."""
        if task not in tasks:
            raise HTTPException(404, _unknown_task(task, tasks))
        _check_limits(body.inputs, max_inputs, max_chars)
        batcher = batcher_of(request)
        if batcher is None:
            raise HTTPException(503, "the server is shutting down")
        try:
            outputs = await batcher.submit(task, body.inputs)
        except ShuttingDown:
            raise HTTPException(503, "the server is shutting down; the request was not run") from None
        except FlexMergeError as e:
            status = 404 if str(e).startswith("unknown task") else 422
            raise HTTPException(status, str(e)) from None
        except Exception as e:
            log.exception("prediction failed for task %r", task)
            raise HTTPException(500, f"prediction failed: {type(e).__name__}: {e}") from None
        return JSONResponse({"task": task, "outputs": outputs})

    return app


# --------------------------------------------------------------------------------------- running


def run_server(app: FastAPI, host: str, port: int, *, log_level: str = "info") -> None:
    """Serve `app` with uvicorn until SIGTERM or Ctrl-C, then shut down gracefully and return.

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
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)  # our log lines next to uvicorn's
    log_config["loggers"]["flexmerge.serve"] = {"handlers": ["default"], "level": log_level.upper(), "propagate": False}
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, log_config=log_config,
                    timeout_graceful_shutdown=GRACEFUL_TIMEOUT_S)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped:
        log.info("stopped by %s", signal.Signals(stopped[0]).name)
