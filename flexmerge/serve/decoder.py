"""Text generation in the HTTP server: the runtime's `Generator` (continuous batching of sequences
of any tasks, `flexmerge.runtime.generation`) stepped in a worker thread whenever a sequence is
waiting or running, so the event loop keeps accepting requests, and streams, while the model
computes. Each request reads its sequence's updates from an asyncio queue, as they come."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

from flexmerge.runtime.generation import Generator, Sampling, Update
from flexmerge.serve.batcher import ShuttingDown

__all__ = ["DecodeLoop", "running_decoder"]

log = logging.getLogger("flexmerge.serve")


class DecodeLoop:
    """Steps `generator` while it has work. A step runs in a worker thread; the updates it returns
    are handed to the requests on the event loop. When the generator goes idle the loop sleeps
    until a request comes, then waits `wait_s` so that requests sent together start together.

    If a step fails, every sequence in flight fails with that error (its requests get a 500) and
    the loop carries on with new requests. Shutdown as the batcher's: `stop_by` a deadline, then
    what has not ended gets ShuttingDown (503, or an error event in a stream)."""

    def __init__(self, generator: Generator, *, wait_s: float):
        self.generator = generator
        self._wait_s = wait_s
        self._queues: dict[int, asyncio.Queue] = {}
        self._arrived = asyncio.Event()
        self._closing = False
        self._deadline: float | None = None
        self._task: asyncio.Task | None = None
        self.steps = 0  # generator steps run (logged at shutdown)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and not self._closing

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="flexmerge-decoder")

    async def close(self) -> None:
        """Stop taking requests, let the step in flight finish, fail what is left with ShuttingDown."""
        self._closing = True
        self._arrived.set()
        if self._task is not None:
            await self._task

    def stop_by(self, deadline: float) -> None:
        """Run no step after loop time `deadline`; then fail what is left with ShuttingDown."""
        self._deadline = deadline
        asyncio.get_running_loop().call_soon(self._arrived.set)

    async def generate(self, task: str, prompt: Sequence[int], sampling: Sampling) -> AsyncIterator[Update]:
        """The updates of one sequence, until it ends. Leaving early (a client that went away)
        cancels it. A prompt too long for the model raises the generator's ConfigError at once."""
        if not self.running:
            raise ShuttingDown()
        generation = self.generator.submit(task, prompt, sampling)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[generation.id] = queue
        self._arrived.set()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            self._queues.pop(generation.id, None)
            if not generation.finished:
                self.generator.cancel(generation)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self._closing and not self._expired(loop):
                if not self.generator.busy:
                    await self._idle(loop)
                    continue
                try:
                    updates = await asyncio.to_thread(self.generator.step)
                except Exception as e:  # the model failed: fail what was in flight, keep serving
                    log.exception("a generation step failed; failing the %d sequences in flight",
                                  len(self._queues))
                    for g in self.generator.abort():
                        self._deliver(g.id, e)
                    continue
                self.steps += 1
                for update in updates:
                    self._deliver(update.generation.id, update)
        finally:
            self._closing = True
            self.generator.abort()
            for queue in self._queues.values():
                queue.put_nowait(ShuttingDown())

    async def _idle(self, loop: asyncio.AbstractEventLoop) -> None:
        """Sleep until a request comes (or the deadline), then gather the ones sent with it."""
        self._arrived.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            timeout = None if self._deadline is None else max(self._deadline - loop.time(), 0.0)
            await asyncio.wait_for(self._arrived.wait(), timeout)
        if self._wait_s > 0 and self.generator.busy and not self._closing:
            await asyncio.sleep(self._wait_s)

    def _expired(self, loop: asyncio.AbstractEventLoop) -> bool:
        return self._deadline is not None and loop.time() >= self._deadline

    def _deliver(self, generation_id: int, item: Update | BaseException) -> None:
        queue = self._queues.get(generation_id)
        if queue is not None:  # else its request is gone
            queue.put_nowait(item)


def running_decoder(state: object) -> DecodeLoop | None:
    """The app's decode loop while it takes requests; None when stopping or when the artifact has
    no text-generation task."""
    decoder = getattr(state, "decoder", None)
    return decoder if decoder is not None and decoder.running else None
