"""The dynamic batcher of the HTTP server: concurrent requests, for any mix of tasks, pooled into
shared forward passes (`Runtime.predict_mixed`) that run one at a time in a worker thread, so the
event loop keeps accepting requests while the model computes and the model is never entered by
two threads at once. Every API family (`flexmerge.serve.api`) submits its inputs here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Batcher", "ShuttingDown", "running_batcher"]

log = logging.getLogger("flexmerge.serve")


class ShuttingDown(Exception):
    """The server is stopping; the request was not (completely) run."""


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
        self._deadline: float | None = None  # loop time after which no new batch starts (shutdown)
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

    def stop_by(self, deadline: float) -> None:
        """Start no batch after loop time `deadline`, then fail what is left with ShuttingDown
        (503): a server told to stop within a grace period answers every request inside it, instead
        of having the ones still queued cancelled (a plain-text 500 each) when the period ends.
        Safe to call from a signal handler of the loop's thread."""
        self._deadline = deadline
        asyncio.get_running_loop().call_soon(self._arrived.set)

    def _expired(self, loop: asyncio.AbstractEventLoop) -> bool:
        return self._deadline is not None and loop.time() >= self._deadline

    def _until_deadline(self, loop: asyncio.AbstractEventLoop, timeout: float | None) -> float | None:
        if self._deadline is None:
            return timeout
        left = max(self._deadline - loop.time(), 0.0)
        return left if timeout is None else min(timeout, left)

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
        while not self._closing and not self._expired(loop) and not self._prune():
            await self._wait(self._until_deadline(loop, None))
        while not self._closing and not self._expired(loop) and self._prune() < self._max_batch:
            left = self._jobs[0].arrived + self._wait_s - loop.time()
            if left <= 0:
                break
            await self._wait(self._until_deadline(loop, left))
        return None if self._closing or self._expired(loop) else self._take()

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


def running_batcher(state: Any) -> Batcher | None:
    """The app's batcher (kept on `app.state` by its lifespan) while it takes requests; None once
    the server is stopping or before it started."""
    batcher = getattr(state, "batcher", None)
    return batcher if batcher is not None and batcher.running else None
