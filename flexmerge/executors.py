"""Where block-parallel work runs: in this process, or as Ray tasks on a local or remote cluster.

Work functions are module-level and take (shared..., item); they must not depend on which
executor runs them. Workers reopen the checkpoints from their paths (see `taskvec.TaskSetSpec`),
so with Ray the inputs must sit on a path every worker can read. Ray workers run torch with the
driver's thread count, so results are bit-identical to the local executor.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import Any, Protocol, TypeVar

from flexmerge._progress import progress
from flexmerge.errors import UnknownNameError
from flexmerge.extras import require_extra

T = TypeVar("T")
EXECUTORS = ("local", "threads", "ray")


class Executor(Protocol):
    name: str

    def map(self, fn: Callable[..., T], items: Sequence[Any], *shared: Any, desc: str = "") -> Iterator[T]:
        """fn(*shared, item) for every item; results in the order of `items`."""
        ...


class LocalExecutor:
    """In this process, one item after another (the default: at most one block in memory).

    With `threads` > 1, that many items run at once on threads, so one item's reads (pread
    releases the GIL) overlap another's arithmetic; up to `threads` + 1 blocks are then alive
    (those running and the one the caller consumes). On the 2-core machine this was measured on
    it was not faster (README, "Scale"), so it is opt-in: `--executor threads`."""

    name = "local"

    def __init__(self, threads: int = 1):
        self.threads = threads

    def map(self, fn, items, *shared, desc=""):
        if self.threads <= 1 or len(items) <= 1:
            for item in progress(items, desc, total=len(items)):
                yield fn(*shared, item)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.threads) as pool:
            for future in _in_flight(items, lambda item: pool.submit(fn, *shared, item), self.threads, desc):
                yield future.result()


class RayExecutor:
    """Ray tasks over items, at most `max_in_flight` at a time so results stream back bounded."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, max_in_flight: int | None = None):
        require_extra("ray", "the Ray executor")
        import ray

        self.ray = ray
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        self.max_in_flight = max_in_flight or max(2, int(ray.cluster_resources().get("CPU", 2)) * 2)
        self._remote = ray.remote(_run_in_worker)

    def map(self, fn, items, *shared, desc=""):
        import torch

        threads = torch.get_num_threads()
        refs = [self.ray.put(x) for x in shared]
        submit = lambda item: self._remote.remote(threads, fn, *refs, item)  # noqa: E731
        for ref in _in_flight(items, submit, self.max_in_flight, desc):
            yield self.ray.get(ref)


def _in_flight(items: Sequence[Any], submit: Callable[[Any], T], limit: int, desc: str) -> Iterator[T]:
    """Handles of submitted items in order, with at most `limit` submitted and not yet handed out,
    so results stream back bounded; progress advances as each one is handed out."""
    pending: deque[T] = deque()
    it = iter(items)
    for _ in progress(items, desc, total=len(items)):
        for item in islice(it, limit - len(pending)):
            pending.append(submit(item))
        yield pending.popleft()


def _run_in_worker(threads: int, fn, *args):
    import torch

    torch.set_num_threads(threads)
    return fn(*args)


def get_executor(name: str | Executor | None = None, address: str | None = None, num_cpus: int | None = None) -> Executor:
    if name is None or name == "local":
        return LocalExecutor()
    if name == "threads":
        return LocalExecutor(threads=2)
    if not isinstance(name, str):
        return name
    if name == "ray":
        return RayExecutor(address, num_cpus)
    raise UnknownNameError("executor", name, EXECUTORS)
