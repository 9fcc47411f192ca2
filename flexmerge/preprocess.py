"""Global, per-task transforms of task vectors applied before planning and merging.

TIES trims each task vector to its top-K% magnitudes over the *whole* model and DARE drops
entries at random. Both must be exact and streaming: the magnitude threshold is found with a
two-pass histogram selection over float bit patterns (exact k-th largest value, memory bounded
by one histogram per task), and DARE's randomness is a counter-based hash of (seed, task,
parameter, element index), so the same entries drop whatever the chunking or read order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from flexmerge._progress import progress
from flexmerge.taskvec import Chunk, TaskSet

_BINS = 1 << 15  # top 16 bits of a non-negative float32's bit pattern (sign bit is 0)


class Transform:
    """A per-task transform of task vectors; `fit` may stream over the task set first."""

    name = "transform"

    def fit(self, tasks: TaskSet, before: "Pipeline") -> None:
        """Compute global statistics; `before` are the transforms that run ahead of this one."""

    def apply(self, task: int, chunk: Chunk, offset: int, delta: torch.Tensor) -> torch.Tensor:
        """Transform one task's delta on `chunk`; `offset` is the chunk's first flat element."""
        raise NotImplementedError

    def params(self) -> dict[str, object]:
        return {}


@dataclass
class Pipeline:
    """An ordered list of fitted transforms; empty means raw task vectors."""

    transforms: list[Transform] = field(default_factory=list)

    def fit(self, tasks: TaskSet) -> "Pipeline":
        for i, tr in enumerate(self.transforms):
            tr.fit(tasks, Pipeline(self.transforms[:i]))
        return self

    def deltas(self, tasks: TaskSet, chunk: Chunk, members: Sequence[int] | None = None,
               base32: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The members' task vectors on `chunk`, transformed (`base32`, `out`: see `TaskSet.deltas`)."""
        idx = list(range(tasks.num_tasks)) if members is None else list(members)
        d = tasks.deltas(chunk, idx, base32=base32, out=out)
        if self.transforms:
            offset = chunk_offset(tasks, chunk)
            d = torch.stack([self.apply_one(t, chunk, offset, d[i]) for i, t in enumerate(idx)])
        return d

    def apply_one(self, task: int, chunk: Chunk, offset: int, delta: torch.Tensor) -> torch.Tensor:
        for tr in self.transforms:
            delta = tr.apply(task, chunk, offset, delta)
        return delta

    def describe(self) -> list[dict[str, object]]:
        return [{"name": tr.name, **tr.params()} for tr in self.transforms]


def chunk_offset(tasks: TaskSet, chunk: Chunk) -> int:
    if chunk.rows is None:
        return 0
    meta = tasks.meta[chunk.key]
    return chunk.rows[0] * (meta.numel // meta.shape[0])


class TopKTrim(Transform):
    """Keep the `keep` fraction of largest-magnitude entries of each task vector (TIES step 1):
    over the whole model (`scope="model"`, the TIES paper's and FlexMerge's), or of each tensor
    on its own (`scope="tensor"`, as mergekit's TIES does)."""

    name = "trim"

    def __init__(self, keep: float, rule: str = "reference", scope: str = "model"):
        from flexmerge.errors import ConfigError

        if not 0.0 < keep <= 1.0:
            raise ConfigError(f"keep must be a fraction in (0, 1], got {keep}")
        if rule not in TRIM_RULES:
            raise ConfigError(f"trim rule must be one of {', '.join(map(repr, TRIM_RULES))}, got {rule!r}")
        if scope not in ("model", "tensor"):
            raise ConfigError(f"trim scope must be 'model' or 'tensor', got {scope!r}")
        self.keep, self.rule, self.scope = keep, rule, scope
        self.thresholds: list[float] = []  # per task (scope "model")
        self.tensor_thresholds: dict[str, list[float]] = {}  # key -> per task (scope "tensor")

    def fit(self, tasks: TaskSet, before: Pipeline) -> None:
        if self.scope == "model":
            total = sum(tasks.meta[k].numel for k in tasks.mergeable)
            self.thresholds = kth_largest_abs(tasks, before, trim_rank(total, self.keep, self.rule))
            return
        self.tensor_thresholds = {
            key: kth_largest_abs(tasks, before, trim_rank(tasks.meta[key].numel, self.keep, self.rule), keys=[key])
            for key in tasks.mergeable if tasks.meta[key].numel}

    def apply(self, task: int, chunk: Chunk, offset: int, delta: torch.Tensor) -> torch.Tensor:
        by_task = self.thresholds if self.scope == "model" else self.tensor_thresholds[chunk.key]
        return torch.where(delta.abs() >= by_task[task], delta, torch.zeros((), dtype=delta.dtype))

    def params(self) -> dict[str, object]:
        return {"keep": self.keep, "rule": self.rule, **({"scope": self.scope} if self.scope != "model" else {})}


TRIM_RULES = ("reference", "exact", "floor")


def trim_rank(total: int, keep: float, rule: str = "reference") -> int:
    """Rank r (1 = largest) of the magnitude threshold: entries with |τ| >= the r-th largest are kept.

    "reference" is the TIES code's rule (also FusionBench's and FlexMerge's): k = int(D·keep) and
    the threshold is the (D − k)-th smallest magnitude, i.e. the (k+1)-th largest, so k+1 entries
    are kept, more on ties at the threshold. "exact" keeps round(D·keep) entries (ties aside), the
    paper's "top-k%". "floor" keeps int(D·keep) entries (at least 1), as mergekit's `magnitude`."""
    if rule == "exact":
        return min(total, max(1, int(round(keep * total))))
    if rule == "floor":
        return min(total, max(1, int(total * keep)))
    return min(total, int(total * keep) + 1)


class DareDrop(Transform):
    """Drop each entry with probability p and rescale the survivors by 1/(1-p) (DARE)."""

    name = "dare"

    def __init__(self, p: float, seed: int = 0):
        if not 0.0 <= p < 1.0:
            from flexmerge.errors import ConfigError

            raise ConfigError(f"DARE drop rate p must be in [0, 1), got {p}")
        self.p, self.seed = p, seed

    def apply(self, task: int, chunk: Chunk, offset: int, delta: torch.Tensor) -> torch.Tensor:
        u = hashed_uniform(self.seed, task, chunk.key, offset, delta.numel()).view_as(delta)
        return torch.where(u >= self.p, delta / (1.0 - self.p), torch.zeros((), dtype=delta.dtype))

    def params(self) -> dict[str, object]:
        return {"p": self.p, "seed": self.seed}


def hashed_uniform(seed: int, task: int, key: str, offset: int, n: int) -> torch.Tensor:
    """Uniform [0, 1) numbers for elements offset..offset+n of one tensor, chunking-independent."""
    salt = int.from_bytes(hashlib.blake2b(f"{seed}/{task}/{key}".encode(), digest_size=7).digest(), "little")
    x = torch.arange(offset, offset + n, dtype=torch.int64) + salt
    # SplitMix64-style finalizer with wrapping int64 arithmetic (constants fit in int64).
    x = x * 0x1E3779B97F4A7C15
    x = x ^ (x >> 31)
    x = x * 0x3F58476D1CE4E5B9
    x = x ^ (x >> 29)
    return ((x >> 11) & ((1 << 24) - 1)).to(torch.float32) / float(1 << 24)


def kth_largest_abs(tasks: TaskSet, before: Pipeline, k: int, keys: Sequence[str] | None = None) -> list[float]:
    """Exact k-th largest |τ_t| over all mergeable entries (or those of `keys`), per task, in two
    streaming passes; entries that fit in one chunk are selected directly."""
    chunks = [c for key in (tasks.mergeable if keys is None else keys) for c in tasks.chunks(key)]
    if len(chunks) == 1:
        return before.deltas(tasks, chunks[0]).abs().flatten(1).float().topk(k, dim=1).values[:, -1].tolist()
    return kth_largest(
        lambda: ((before.deltas(tasks, c).abs()) for c in chunks),
        k, tasks.num_tasks, len(chunks), "trim thresholds",
    )


def kth_largest(
    stream: Callable[[], Iterable[torch.Tensor]], k: int, rows: int, total: int | None, desc: str
) -> list[float]:
    """Exact k-th largest value per row over a stream of non-negative (rows, ...) tensors.

    Pass 1 histograms the top 16 bits of each float32 bit pattern (monotone for x >= 0) and
    finds the bin holding the k-th value; pass 2 keeps only that bin's values and selects in it.
    """
    hist = torch.zeros(rows, _BINS, dtype=torch.int64)
    for x in progress(stream(), f"{desc} (1/2)", total=total):
        bins = _bits(x).reshape(rows, -1) >> 16
        for r in range(rows):
            hist[r] += torch.bincount(bins[r], minlength=_BINS)
    above = hist.flip(1).cumsum(1).flip(1)  # above[r, b] = count of values in bins >= b
    target_bin, rank_in_bin = [], []
    for r in range(rows):
        b = int((above[r] >= k).nonzero().max()) if int(above[r, 0]) >= k else 0
        target_bin.append(b)
        higher = int(above[r, b + 1]) if b + 1 < _BINS else 0
        rank_in_bin.append(k - higher)
    # The bin sizes are known, so the candidates go into preallocated buffers: collecting many
    # small tensors instead fragments the heap and inflates the resident memory.
    kept = [torch.empty(int(hist[r, target_bin[r]])) for r in range(rows)]
    filled = [0] * rows
    for x in progress(stream(), f"{desc} (2/2)", total=total):
        flat = x.reshape(rows, -1).float()
        bins = _bits(flat) >> 16
        for r in range(rows):
            vals = flat[r][bins[r] == target_bin[r]]
            kept[r][filled[r]:filled[r] + vals.numel()] = vals
            filled[r] += vals.numel()
    out = []
    for r in range(rows):
        vals = kept[r] if kept[r].numel() else torch.zeros(1)
        rank = min(max(rank_in_bin[r], 1), vals.numel())
        out.append(float(torch.topk(vals, rank).values[-1]))
    return out


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.float().contiguous().view(torch.int32).to(torch.int64)


def fitted_pipeline(tasks: TaskSet, method) -> Pipeline:
    """The method's preprocessing, fitted on `tasks`; cached on the task set (fitting streams)."""
    import json

    pipeline = method.pipeline()
    key = json.dumps(pipeline.describe(), sort_keys=True)
    if key not in tasks.fitted:
        tasks.fitted[key] = pipeline.fit(tasks)
    return tasks.fitted[key]
