"""Global, per-task transforms of task vectors applied before planning and merging.

TIES trims each task vector to its top-K% magnitudes over the *whole* model and DARE drops
entries at random. Both must be exact and streaming: the magnitude threshold is found with a
two-pass histogram selection over float bit patterns (exact k-th largest value, memory bounded
by one histogram per task), and DARE's randomness is a counter-based hash of (seed, task,
parameter, element index), so the same entries drop whatever the chunking or read order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from flexmerge._progress import progress
from flexmerge._scratch import DELTAS, TEMP_A, TEMP_B, release, scratch
from flexmerge.device import to_device
from flexmerge.errors import ConfigError
from flexmerge.io.source import rows_shape
from flexmerge.taskvec import Chunk, TaskSet

_BINS = 1 << 15  # top 16 bits of a non-negative float32's bit pattern (sign bit is 0)


class Transform:
    """A per-task transform of task vectors; `fit` may stream over the task set first."""

    name = "transform"

    def fit(self, tasks: TaskSet, before: "Pipeline", device: torch.device | None = None) -> None:
        """Compute global statistics; `before` are the transforms that run ahead of this one;
        `device`: where the streamed chunks are computed on (the statistics do not depend on it)."""

    def apply(self, task: int, chunk: Chunk, offset: int, delta: torch.Tensor) -> torch.Tensor:
        """Transform one task's delta on `chunk`; `offset` is the chunk's first flat element."""
        raise NotImplementedError

    def apply_rows(self, tasks: Sequence[int], chunk: Chunk, offset: int, deltas: torch.Tensor) -> None:
        """Transform the (n, ...) deltas of `tasks` in place (row i is task tasks[i]); transforms
        that can act on all rows at once override it, so no per-task copies are made."""
        for i, t in enumerate(tasks):
            deltas[i].copy_(self.apply(t, chunk, offset, deltas[i]))

    def params(self) -> dict[str, object]:
        return {}


@dataclass
class Pipeline:
    """An ordered list of fitted transforms; empty means raw task vectors."""

    transforms: list[Transform] = field(default_factory=list)

    def fit(self, tasks: TaskSet, device: torch.device | None = None) -> "Pipeline":
        for i, tr in enumerate(self.transforms):
            tr.fit(tasks, Pipeline(self.transforms[:i]), device)
        return self

    def deltas(self, tasks: TaskSet, chunk: Chunk, members: Sequence[int] | None = None,
               base32: torch.Tensor | None = None, out: torch.Tensor | None = None,
               device: torch.device | None = None) -> torch.Tensor:
        """The members' task vectors on `chunk`, transformed (`base32`, `out`: see `TaskSet.deltas`).

        They are read on the host and moved to `device` (None: stay there), where the transforms run."""
        idx = list(range(tasks.num_tasks)) if members is None else list(members)
        d = to_device(tasks.deltas(chunk, idx, base32=base32, out=out), device)
        if self.transforms:
            offset = chunk_offset(tasks, chunk)
            for tr in self.transforms:  # in place: `d` is the caller's buffer or a fresh tensor
                tr.apply_rows(idx, chunk, offset, d)
        return d

    def apply_one(self, task: int, chunk: Chunk, offset: int, delta: torch.Tensor) -> torch.Tensor:
        for tr in self.transforms:
            delta = tr.apply(task, chunk, offset, delta)
        return delta

    def describe(self) -> list[dict[str, object]]:
        return [{"name": tr.name, **tr.params()} for tr in self.transforms]


class PerTensor(Transform):
    """Preprocessing that differs by tensor (per-tensor method parameters): `transforms_of(key)`
    gives each tensor's transforms; tensors whose transforms are alike share one pipeline, fitted
    on those tensors alone (a trim over the whole model takes its threshold over them)."""

    name = "per_tensor"

    def __init__(self, transforms_of: Callable[[str], list[Transform]]):
        self.transforms_of = transforms_of
        self.pipelines: dict[str, Pipeline] = {}  # key -> its group's fitted pipeline

    def fit(self, tasks: TaskSet, before: Pipeline, device: torch.device | None = None) -> None:
        if before.transforms:
            raise ConfigError("per-tensor preprocessing must come first")
        groups: dict[str, tuple[Pipeline, list[str]]] = {}
        for key in tasks.mergeable:
            pipe = Pipeline(self.transforms_of(key))
            groups.setdefault(json.dumps(pipe.describe(), sort_keys=True), (pipe, []))[1].append(key)
        for pipe, keys in groups.values():
            # the tensors of one group, without the validation pass's whole-model histogram
            pipe.fit(dataclasses.replace(tasks, mergeable=keys, first_pass={}), device)
            self.pipelines.update(dict.fromkeys(keys, pipe))

    def apply(self, task: int, chunk: Chunk, offset: int, delta: torch.Tensor) -> torch.Tensor:
        return self.pipelines[chunk.key].apply_one(task, chunk, offset, delta)

    def apply_rows(self, tasks: Sequence[int], chunk: Chunk, offset: int, deltas: torch.Tensor) -> None:
        for tr in self.pipelines[chunk.key].transforms:
            tr.apply_rows(tasks, chunk, offset, deltas)

    def params(self) -> dict[str, object]:
        return {"groups": len({id(p) for p in self.pipelines.values()})}


def chunk_offset(tasks: TaskSet, chunk: Chunk) -> int:
    if chunk.rows is None:
        return 0
    meta = tasks.meta[chunk.key]
    return chunk.rows[0] * (meta.numel // meta.shape[0])


class TopKTrim(Transform):
    """Keep the `keep` fraction of largest-magnitude entries of each task vector (TIES step 1):
    over the whole model (`scope="model"`, the TIES paper's and FlexMerge's), or of each tensor
    on its own (`scope="tensor"`, as mergekit's TIES does). `keep` is one fraction for every
    task, or one per task (a tuple in task order: mergekit's per-model density)."""

    name = "trim"

    def __init__(self, keep: float | tuple[float, ...], rule: str = "reference", scope: str = "model"):
        if not all(0.0 < k <= 1.0 for k in _per_task(keep)):
            raise ConfigError(f"keep must be a fraction in (0, 1], got {keep}")
        if rule not in TRIM_RULES:
            raise ConfigError(f"trim rule must be one of {', '.join(map(repr, TRIM_RULES))}, got {rule!r}")
        if scope not in ("model", "tensor"):
            raise ConfigError(f"trim scope must be 'model' or 'tensor', got {scope!r}")
        self.keep, self.rule, self.scope = keep, rule, scope
        self.thresholds: list[float] = []  # per task (scope "model")
        self.tensor_thresholds: dict[str, list[float]] = {}  # key -> per task (scope "tensor")
        self._limits: dict[str | None, torch.Tensor] = {}  # the thresholds' fp32 bit patterns, by key (None: model)

    def fit(self, tasks: TaskSet, before: Pipeline, device: torch.device | None = None) -> None:
        if self.scope == "model":
            total = sum(tasks.meta[k].numel for k in tasks.mergeable)
            self.thresholds = kth_largest_abs(tasks, before, self._ranks(total, tasks.num_tasks), device=device)
            self._limits = {None: _bit_patterns(self.thresholds)}
            return
        self.tensor_thresholds = {
            key: kth_largest_abs(tasks, before, self._ranks(tasks.meta[key].numel, tasks.num_tasks), keys=[key],
                                 device=device)
            for key in tasks.mergeable if tasks.meta[key].numel}
        self._limits = {key: _bit_patterns(v) for key, v in self.tensor_thresholds.items()}

    def _ranks(self, total: int, num_tasks: int) -> int | list[int]:
        """The threshold's rank among `total` entries: one for all tasks, or each task's."""
        if isinstance(self.keep, tuple):
            if len(self.keep) != num_tasks:
                raise ConfigError(f"a keep per task needs {num_tasks} values, got {len(self.keep)}")
            return [trim_rank(total, k, self.rule) for k in self.keep]
        return trim_rank(total, self.keep, self.rule)

    def apply(self, task: int, chunk: Chunk, offset: int, delta: torch.Tensor) -> torch.Tensor:
        by_task = self.thresholds if self.scope == "model" else self.tensor_thresholds[chunk.key]
        return torch.where(delta.abs() >= by_task[task], delta, torch.zeros((), dtype=delta.dtype, device=delta.device))

    def apply_rows(self, tasks: Sequence[int], chunk: Chunk, offset: int, deltas: torch.Tensor) -> None:
        """Zero |τ| < threshold in place, all rows at once, on fp32 bit patterns: with the sign bit
        cleared they are ordered as the magnitudes (denormals included), and (limit − 1 − |τ|) >> 31
        is all ones exactly where |τ| >= limit, a mask that keeps the kept bits (signed zeros
        too) and writes +0 elsewhere, as `apply`'s where() does; 5x faster than a bool mask here."""
        if deltas.dtype != torch.float32 or not deltas.is_contiguous():
            return super().apply_rows(tasks, chunk, offset, deltas)
        by_key = self._limits[None if self.scope == "model" else chunk.key]
        limits = (by_key[list(tasks)] - 1).to(deltas.device).view(-1, *[1] * (deltas.dim() - 1))
        mask = magnitude_bits(deltas, TEMP_A)
        torch.sub(limits, mask, out=mask).bitwise_right_shift_(31)
        deltas.view(torch.int32).bitwise_and_(mask)

    def params(self) -> dict[str, object]:
        keep = list(self.keep) if isinstance(self.keep, tuple) else self.keep
        return {"keep": keep, "rule": self.rule, **({"scope": self.scope} if self.scope != "model" else {})}


TRIM_RULES = ("reference", "exact", "floor")


def _per_task(value: float | tuple[float, ...]) -> tuple[float, ...]:
    """A rate given once for all tasks or per task, as a tuple."""
    return value if isinstance(value, tuple) else (value,)


def _bit_patterns(thresholds: list[float]) -> torch.Tensor:
    """fp32 thresholds as their int32 bit patterns (ordered as the magnitudes, see `apply_rows`)."""
    return torch.tensor(thresholds, dtype=torch.float32).view(torch.int32)


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
    """Drop each entry with probability p and rescale the survivors by 1/(1-p) (DARE); `p` is one
    rate for every task, or one per task (a tuple in task order)."""

    name = "dare"

    def __init__(self, p: float | tuple[float, ...], seed: int = 0):
        if not all(0.0 <= x < 1.0 for x in _per_task(p)):
            raise ConfigError(f"DARE drop rate p must be in [0, 1), got {p}")
        self.p, self.seed = p, seed

    def apply(self, task: int, chunk: Chunk, offset: int, delta: torch.Tensor) -> torch.Tensor:
        p = self.p[task] if isinstance(self.p, tuple) else self.p
        u = hashed_uniform(self.seed, task, chunk.key, offset, delta.numel(), delta.device).view_as(delta)
        return torch.where(u >= p, delta / (1.0 - p), torch.zeros((), dtype=delta.dtype, device=delta.device))

    def params(self) -> dict[str, object]:
        return {"p": list(self.p) if isinstance(self.p, tuple) else self.p, "seed": self.seed}


class OutlierTrim(Transform):
    """Model Breadcrumbs' sparsification, as mergekit's `magnitude_outliers`: in each tensor of each
    task vector (N entries), the int(γ·N) largest magnitudes are dropped (fewer when needed to keep
    int(density·N)), and of the rest the int(density·N) largest are kept: by rank from the smallest,
    [N − int(density·N) − int(γ·N), that + int(density·N)). The band's two magnitudes are found
    exactly (`kth_largest_abs`); entries tied with either are kept (mergekit's sort keeps exactly the
    band's count, choosing among ties by position)."""

    name = "outlier_trim"

    def __init__(self, density: float, gamma: float):
        if not 0.0 <= density <= 1.0 or not 0.0 <= gamma <= 1.0:
            raise ConfigError(f"density and gamma must be fractions in [0, 1], got {density} and {gamma}")
        self.density, self.gamma = density, gamma
        self.bands: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}  # key -> per task (lo, hi); None: none kept

    def fit(self, tasks: TaskSet, before: Pipeline, device: torch.device | None = None) -> None:
        self.bands = {}
        for key in tasks.mergeable:
            n = tasks.meta[key].numel
            kept, top = int(self.density * n), int(self.gamma * n)
            bottom = max(0, n - kept - top)
            if kept == 0:
                self.bands[key] = None
                continue
            lo = kth_largest_abs(tasks, before, n - bottom, keys=[key], device=device)
            hi = kth_largest_abs(tasks, before, n - bottom - kept + 1, keys=[key], device=device)
            self.bands[key] = (torch.tensor(lo), torch.tensor(hi))

    def apply(self, task: int, chunk: Chunk, offset: int, delta: torch.Tensor) -> torch.Tensor:
        out = delta.unsqueeze(0).clone()
        self.apply_rows([task], chunk, offset, out)
        return out[0]

    def apply_rows(self, tasks: Sequence[int], chunk: Chunk, offset: int, deltas: torch.Tensor) -> None:
        band = self.bands[chunk.key]
        if band is None:
            deltas.zero_()
            return
        shape = (-1, *[1] * (deltas.dim() - 1))
        lo, hi = (b[list(tasks)].to(deltas.device, deltas.dtype).view(shape) for b in band)
        a = deltas.abs()
        deltas.copy_(torch.where((a >= lo) & (a <= hi), deltas, torch.zeros((), dtype=deltas.dtype,
                                                                                device=deltas.device)))

    def params(self) -> dict[str, object]:
        return {"density": self.density, "gamma": self.gamma}


class MagPrune(Transform):
    """DELLA's MAGPRUNE, as mergekit's `della_magprune`: in each row of each tensor of each task
    vector, the entry of magnitude rank r (1 = the smallest of the row's C) is kept with probability
    density − ε + 2ε·(r − 1)/(C − 1) (density itself when C = 1), drawn from the seeded counter hash
    (`hashed_uniform`: the same draws whatever the chunking). Rows are ranked along the tensor's
    second dimension (mergekit's dim=1); a 1-D tensor is one row, ranked against the whole tensor
    even when it is read in several chunks (its sorted magnitudes are kept from `fit`)."""

    name = "magprune"

    def __init__(self, density: float, epsilon: float, seed: int = 0):
        if not 0.0 < density - epsilon and density + epsilon < 1.0:
            raise ConfigError(f"density ± epsilon must lie in (0, 1), got density {density}, epsilon {epsilon}")
        self.density, self.epsilon, self.seed = density, epsilon, seed
        self.sorted: dict[str, torch.Tensor] = {}  # 1-D key read in several chunks -> (M, N) sorted |τ|

    def fit(self, tasks: TaskSet, before: Pipeline, device: torch.device | None = None) -> None:
        self.sorted = {}
        for key in tasks.mergeable:
            chunks = list(tasks.chunks(key))
            if len(tasks.meta[key].shape) == 1 and len(chunks) > 1:
                whole = torch.cat([before.deltas(tasks, c, device=device) for c in chunks], dim=1)
                self.sorted[key] = whole.abs().sort(dim=1).values

    def apply(self, task: int, chunk: Chunk, offset: int, delta: torch.Tensor) -> torch.Tensor:
        out = delta.unsqueeze(0).clone()
        self.apply_rows([task], chunk, offset, out)
        return out[0]

    def apply_rows(self, tasks: Sequence[int], chunk: Chunk, offset: int, deltas: torch.Tensor) -> None:
        keep = self.keep_probability(tasks, chunk.key, deltas.abs())
        u = torch.stack([hashed_uniform(self.seed, t, f"{chunk.key}#magprune", offset, deltas[0].numel(),
                                        deltas.device) for t in tasks]).view_as(deltas)
        deltas.copy_(torch.where(u < keep, deltas, torch.zeros((), dtype=deltas.dtype, device=deltas.device)))

    def keep_probability(self, tasks: Sequence[int], key: str, magnitudes: torch.Tensor) -> torch.Tensor:
        """Each entry's keep probability from its magnitude rank in its row ((n, ...) `magnitudes`)."""
        if magnitudes.dim() == 1:  # scalars: rows of one entry
            return torch.full_like(magnitudes, self.density)
        if key in self.sorted:
            whole = self.sorted[key][list(tasks)].to(magnitudes.device)
            ranks, count = torch.searchsorted(whole, magnitudes.contiguous()).to(magnitudes.dtype), whole.shape[1]
        else:
            dim = 1 if magnitudes.dim() == 2 else 2  # a 1-D tensor's row, else the tensor's dim 1
            ranks = magnitudes.argsort(dim=dim).argsort(dim=dim).to(magnitudes.dtype)
            count = magnitudes.shape[dim]
        spread = ranks / (count - 1) if count > 1 else torch.full_like(ranks, 0.5)
        return (self.density - self.epsilon) + spread * (2 * self.epsilon)

    def params(self) -> dict[str, object]:
        return {"density": self.density, "epsilon": self.epsilon, "seed": self.seed}


class L1Rescale(Transform):
    """mergekit's `rescale` of a sparsification (`rescaled_masked_tensor`, norm l1): what `inner`
    keeps of each tensor of each task vector is scaled by Σ|τ| / Σ|kept|, so the tensor keeps its
    L1 norm (left as kept when either sum is below 1e-7). `fit` streams the inputs once more to sum."""

    def __init__(self, inner: Transform):
        self.inner = inner
        self.name = inner.name
        self.factors: dict[str, torch.Tensor] = {}  # key -> (M,) fp32

    def fit(self, tasks: TaskSet, before: Pipeline, device: torch.device | None = None) -> None:
        self.inner.fit(tasks, before, device)
        everyone = list(range(tasks.num_tasks))
        self.factors = {}
        for key in tasks.mergeable:
            total = torch.zeros(2, tasks.num_tasks, dtype=torch.float64)
            for c in tasks.chunks(key):
                d = before.deltas(tasks, c, device=device)
                kept = d.clone()
                self.inner.apply_rows(everyone, c, chunk_offset(tasks, c), kept)
                total[0] += d.abs().flatten(1).sum(1, dtype=torch.float64).cpu()
                total[1] += kept.abs().flatten(1).sum(1, dtype=torch.float64).cpu()
            before_l1, after_l1 = total
            small = (before_l1 < 1e-7) | (after_l1 < 1e-7)
            self.factors[key] = torch.where(small, 1.0, before_l1 / after_l1.clamp_min(1e-300)).float()

    def apply(self, task: int, chunk: Chunk, offset: int, delta: torch.Tensor) -> torch.Tensor:
        return self.inner.apply(task, chunk, offset, delta) * float(self.factors[chunk.key][task])

    def apply_rows(self, tasks: Sequence[int], chunk: Chunk, offset: int, deltas: torch.Tensor) -> None:
        self.inner.apply_rows(tasks, chunk, offset, deltas)
        factor = self.factors[chunk.key][list(tasks)].to(deltas.device, deltas.dtype)
        deltas.mul_(factor.view(-1, *[1] * (deltas.dim() - 1)))

    def params(self) -> dict[str, object]:
        return {**self.inner.params(), "rescale": "l1"}


def hashed_uniform(seed: int, task: int, key: str, offset: int, n: int,
                   device: torch.device | None = None) -> torch.Tensor:
    """Uniform [0, 1) numbers for elements offset..offset+n of one tensor, chunking-independent
    (integer arithmetic: the same numbers on every device)."""
    salt = int.from_bytes(hashlib.blake2b(f"{seed}/{task}/{key}".encode(), digest_size=7).digest(), "little")
    x = torch.arange(offset, offset + n, dtype=torch.int64, device=device) + salt
    # SplitMix64-style finalizer with wrapping int64 arithmetic (constants fit in int64).
    x = x * 0x1E3779B97F4A7C15
    x = x ^ (x >> 31)
    x = x * 0x3F58476D1CE4E5B9
    x = x ^ (x >> 29)
    return ((x >> 11) & ((1 << 24) - 1)).to(torch.float32) / float(1 << 24)


def kth_largest_abs(tasks: TaskSet, before: Pipeline, k: int | Sequence[int], keys: Sequence[str] | None = None,
                    device: torch.device | None = None) -> list[float]:
    """Exact k-th largest |τ_t| over all mergeable entries (or those of `keys`), per task (`k`: one
    rank for all, or each task's), in two streaming passes (on `device`); entries that fit in one
    chunk are selected directly. The first pass is skipped when the validation pass made its
    histogram (`MagnitudeHistogram`)."""
    chunks = [c for key in (tasks.mergeable if keys is None else keys) for c in tasks.chunks(key)]
    if len(chunks) == 1:
        d = before.deltas(tasks, chunks[0], device=device).abs().flatten(1).float()
        if isinstance(k, int):
            return d.topk(k, dim=1).values[:, -1].tolist()
        return [float(row.topk(r).values[-1]) for row, r in zip(d, k)]

    def stream() -> Iterable[torch.Tensor]:
        for c in chunks:
            shape = (tasks.num_tasks, *rows_shape(tasks.meta[c.key].shape, c.rows))
            yield before.deltas(tasks, c, out=scratch(DELTAS, shape, tasks.compute_dtype), device=device)

    observed = tasks.first_pass.get(MagnitudeHistogram.name) if keys is None and not before.transforms else None
    try:
        return kth_largest(stream, k, tasks.num_tasks, len(chunks), "trim thresholds",
                           hist=None if observed is None else observed.to(device or "cpu"))
    finally:
        release()  # the pass's buffers do not outlive it


class MagnitudeHistogram:
    """The trim's first pass (per task, how many |τ| fall in each top-16-bit bin of the fp32
    pattern), done by the validation pass (a `PassObserver`): a global trim then reads the
    inputs for its candidate bin only. Keys found frozen were counted as zeros and are taken
    out again, so the counts are those of the mergeable entries, as `kth_largest`'s own pass."""

    name = "magnitude_histogram"

    def __init__(self) -> None:
        self.hist: torch.Tensor | None = None
        self.offsets: torch.Tensor | None = None
        self._lock = threading.Lock()  # `--executor threads` scans two keys at once

    def begin(self, meta, num_tasks: int) -> bool:
        self.hist = torch.zeros(num_tasks * _BINS, dtype=torch.int64)
        self.offsets = _row_offsets(num_tasks, self.hist.device)
        return True

    def see(self, chunk: Chunk, base: torch.Tensor, deltas: torch.Tensor) -> None:
        bins = _bins(deltas, self.offsets)
        with self._lock:
            _count_into(self.hist, bins.view(-1))

    def finish(self, tasks: TaskSet) -> torch.Tensor:
        mergeable = set(tasks.mergeable)
        zeros = sum(m.numel for k, m in tasks.meta.items() if m.dtype.is_floating_point and k not in mergeable)
        self.hist.view(tasks.num_tasks, _BINS)[:, 0] -= zeros  # a frozen key's τ is +0 everywhere: bin 0
        return self.hist


def _row_offsets(rows: int, device) -> torch.Tensor:
    return (torch.arange(rows, dtype=torch.int32, device=device) * _BINS).view(rows, 1)


def _bins(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Each |x|'s bin: the top 16 bits of its fp32 pattern, offset by its row's first bin."""
    return magnitude_bits(_rows32(x, offsets.shape[0]), TEMP_A).bitwise_right_shift_(16).add_(offsets)


def _histogram_into(hist: torch.Tensor, offsets: torch.Tensor, x: torch.Tensor) -> None:
    """Count each row's |x| into its own _BINS bins of `hist` (rows * _BINS, int64)."""
    _count_into(hist, _bins(x, offsets).view(-1))


def kth_largest(
    stream: Callable[[], Iterable[torch.Tensor]], k: int | Sequence[int], rows: int, total: int | None, desc: str,
    hist: torch.Tensor | None = None,
) -> list[float]:
    """Exact k-th largest magnitude per row (`k`: one rank, or each row's) over a stream of
    (rows, ...) float tensors.

    Pass 1 histograms the top 16 bits of each |x|'s fp32 bit pattern (monotone in |x|) with one
    bincount for all rows (or `hist`, its result, is given); pass 2 keeps only the values in the
    bin holding the k-th one and selects in them. Memory: the histograms, one chunk, and the
    candidate bins. The work runs on the stream's device; counts and selections are exact, so
    the thresholds are the same on every device."""
    if hist is None:
        for x in progress(stream(), f"{desc} (1/2)", total=total):
            if hist is None:  # on the device the chunks come on
                hist = torch.zeros(rows * _BINS, dtype=torch.int64, device=x.device)
                offsets = _row_offsets(rows, x.device)
            _histogram_into(hist, offsets, x)
    if hist is None:  # an empty stream: no values, every threshold 0 as before
        hist = torch.zeros(rows * _BINS, dtype=torch.int64)
    device = hist.device
    hist = hist.view(rows, _BINS)
    above = hist.flip(1).cumsum(1).flip(1)  # above[r, b] = count of values in bins >= b
    target_bin, rank_in_bin = [], []
    for r in range(rows):
        kr = k if isinstance(k, int) else k[r]
        b = int((above[r] >= kr).nonzero().max()) if int(above[r, 0]) >= kr else 0
        target_bin.append(b)
        higher = int(above[r, b + 1]) if b + 1 < _BINS else 0
        rank_in_bin.append(kr - higher)
    # The bin sizes are known, so the candidates go into preallocated buffers: collecting many
    # small tensors instead fragments the heap and inflates the resident memory.
    kept = [torch.empty(int(hist[r, target_bin[r]]), device=device) for r in range(rows)]
    filled = [0] * rows
    target = torch.tensor(target_bin, dtype=torch.int32, device=device).view(rows, 1)
    for x in progress(stream(), f"{desc} (2/2)", total=total):
        flat = _rows32(x, rows)
        bins = magnitude_bits(flat, TEMP_A).bitwise_right_shift_(16)
        hit = torch.eq(bins, target, out=scratch(TEMP_B, bins.shape, torch.bool, bins.device))
        # The candidate bins hold ~0.1% of the entries: their flat positions (row-major, so each
        # row's run is contiguous), then one gather, is half the time of hit.sum(1) + flat[hit].
        where = hit.view(-1).nonzero().squeeze(1)
        counts = torch.bincount(where // max(flat.shape[1], 1), minlength=rows).tolist()
        for r, vals in enumerate(torch.split(flat.view(-1)[where].abs_(), counts)):
            kept[r][filled[r]:filled[r] + vals.numel()] = vals
            filled[r] += vals.numel()
    out = []
    for r in range(rows):
        vals = kept[r] if kept[r].numel() else torch.zeros(1, device=device)
        rank = min(max(rank_in_bin[r], 1), vals.numel())
        out.append(float(torch.topk(vals, rank).values[-1]))
    return out


def _count_into(hist: torch.Tensor, bins: torch.Tensor) -> None:
    """hist[b] += how often b occurs in `bins` (int32). bincount costs ~10 ms per call whatever the
    input's size (it sizes its output), index_add_ is fast on small inputs and slower on large."""
    if bins.numel() >= 1 << 20:
        hist += torch.bincount(bins, minlength=hist.numel())
    else:
        hist.index_add_(0, bins, torch.ones(1, dtype=hist.dtype, device=hist.device).expand(bins.numel()))


def magnitude_bits(x: torch.Tensor, name: str) -> torch.Tensor:
    """The int32 bit patterns of |x| for contiguous fp32 `x` (sign bit cleared), in a scratch buffer."""
    return torch.bitwise_and(x.view(torch.int32), 0x7FFFFFFF, out=scratch(name, x.shape, torch.int32, x.device))


def _rows32(x: torch.Tensor, rows: int) -> torch.Tensor:
    """`x` as a contiguous (rows, n) fp32 tensor (fp16/bf16 converted exactly)."""
    return x.reshape(rows, -1).to(torch.float32).contiguous()


def fitted_pipeline(tasks: TaskSet, method, device: torch.device | None = None) -> Pipeline:
    """The method's preprocessing, fitted on `tasks` (streaming on `device`; what it finds is the
    same on every device). Fitting a trim streams the inputs: a caller that plans and merges
    fits once and hands the result to both (`build_path(pipeline=...)`, `materialize(pipeline=...)`)."""
    return method.pipeline().fit(tasks, device)
