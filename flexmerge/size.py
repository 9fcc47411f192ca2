"""Exact storage accounting: the only place sizes are computed.

size = stored bytes / bytes of one fine-tuned model as the artifact stores it. The unit is one
whole fine-tune: its mergeable parameters at the dtype the artifact stores them (a method's
`dtype`), plus its own parameters (heads, ...; the mean over the tasks where they differ in
size). So keeping every fine-tune is exactly Mx, and a size counts the tasks' own parameters as
every point stores them. Frozen shared parameters are stored once and reported apart.

Per (block, group) what is stored is, for plain methods, one copy of the block's weights; for
mask methods, a group of n >= 3 members stores the unified vector, n bit-packed masks (one byte
per 8 entries, per tensor part) and, for methods with rescalers, n fp32 scalars, and the block
then needs θ0 once. A mask group of 1 or 2 members gains nothing from masks, so its members are
stored as plain copies (FlexMerge's rule). For residual methods (Twin-Merging), a group of n >= 2
stores one copy (θ0 + shared) and per member its residual: r·(rows + cols) entries for a 2-D
tensor kept at rank r, every entry of any other tensor. The artifact writer stores exactly this.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from flexmerge.blocks import Partition
from flexmerge.errors import ConfigError
from flexmerge.io.source import TensorMeta
from flexmerge.methods.base import MergeMethod

MIN_MASKED_MEMBERS = 3
SCALE_BYTES = 4


@dataclass(frozen=True)
class ModelUnit:
    """One fine-tuned model as stored, kept as the exact ratio (bytes of all M fine-tunes) / M, so
    that the all-fine-tunes point is exactly M and not M within rounding."""

    all_models: int  # the M fine-tunes as the artifact would store them: mergeable + their own
    models: int  # M

    @classmethod
    def from_nbytes(cls, nbytes: float, models: int) -> "ModelUnit":
        """The unit of a flex model that kept only its float value (one model's bytes)."""
        return cls(round(nbytes * models), models)

    @property
    def nbytes(self) -> float:
        return self.all_models / self.models

    def of(self, nbytes: float) -> float:
        """`nbytes` in model units (int arithmetic first: correctly rounded)."""
        return nbytes * self.models / self.all_models


def mergeable_bytes(meta: Mapping[str, TensorMeta], keys, method: MergeMethod) -> int:
    """Bytes of one copy of `keys` at the dtype `method` stores them."""
    return sum(meta[k].numel * method.storage_dtype(meta[k].dtype).itemsize for k in keys)


def model_unit(tasks, method: MergeMethod) -> ModelUnit:
    """The size unit of `tasks` merged with `method`: one whole fine-tune as stored."""
    m = tasks.num_tasks
    return ModelUnit(m * mergeable_bytes(tasks.meta, tasks.mergeable, method) + tasks.specific_bytes(), m)


def point_size(tasks, partition: Partition, method: MergeMethod, groups_per_block: Sequence[Sequence[int]]) -> float:
    """A point's size in model units: what its blocks store, plus the tasks' own parameters."""
    return SizeModel.build(partition, tasks, method).size(groups_per_block)


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'300MB', '1.5 GiB', '4096' -> bytes (decimal KB/MB/GB, binary KiB/MiB/GiB)."""
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or (unit and unit not in _UNITS):
        raise ConfigError(f"{text!r} is not a size in bytes; write e.g. 300MB, 1.5GiB or 4096")
    return int(float(m.group(1)) * _UNITS[unit or "b"])


def format_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def stored_with_masks(method: MergeMethod, members: int) -> bool:
    return method.uses_masks and members >= MIN_MASKED_MEMBERS


def residual_entries(method: MergeMethod, shape: tuple[int, ...]) -> int:
    """Entries of one member's stored residual of a tensor of `shape`: the two factors at the
    method's rank (full rank where the rank depends on the data: an upper bound), or all entries."""
    if len(shape) != 2:
        return math.prod(shape)
    r = method.residual_rank(tuple(shape))
    return (min(shape) if r is None else r) * (shape[0] + shape[1])




@dataclass(frozen=True)
class SizeModel:
    """Per-block byte counts of one partition, the method whose storage they follow, and the
    tasks' own parameters (stored at every point)."""

    block_bytes: tuple[int, ...]  # one stored copy of the block's weights
    mask_bytes: tuple[int, ...]  # one member's bit-packed masks (parts padded to whole bytes)
    unit: ModelUnit
    method: MergeMethod
    residual_bytes: tuple[int, ...] = ()  # one member's stored residuals (residual methods)
    specific_bytes: int = 0  # every task's own parameters, all tasks together

    @classmethod
    def build(cls, partition: Partition, tasks, method: MergeMethod) -> "SizeModel":
        """Stored copies are in the method's storage dtype; the unit is one fine-tune as stored."""
        meta = tasks.meta
        stored = [sum(p.numel(meta[p.key]) * method.storage_dtype(meta[p.key].dtype).itemsize for p in b.parts)
                  for b in partition.blocks]
        masks = [sum(-(-p.numel(meta[p.key]) // 8) for p in b.parts) for b in partition.blocks]
        residuals = [sum(residual_entries(method, v.shape) * method.storage_dtype(meta[v.key].dtype).itemsize
                         for v in b.views(meta)) for b in partition.blocks] if method.uses_residuals else []
        return cls(tuple(stored), tuple(masks), model_unit(tasks, method), method, tuple(residuals),
                   tasks.specific_bytes())

    def group_bytes(self, block: int, members: int) -> int:
        if self.method.uses_residuals:
            return self.block_bytes[block] + (members * self.residual_bytes[block] if members > 1 else 0)
        if stored_with_masks(self.method, members):
            scales = SCALE_BYTES * members if self.method.uses_scales else 0
            return self.block_bytes[block] + members * self.mask_bytes[block] + scales
        copies = members if self.method.uses_masks else 1
        return copies * self.block_bytes[block]

    def block_total(self, block: int, group_sizes: Sequence[int]) -> int:
        base = self.block_bytes[block] if any(stored_with_masks(self.method, n) for n in group_sizes) else 0
        return base + sum(self.group_bytes(block, n) for n in group_sizes)

    def total_bytes(self, groups_per_block: Sequence[Sequence[int]]) -> int:
        """Everything a point stores but the frozen parameters: its blocks and the tasks' own."""
        return sum(self.block_total(b, sizes) for b, sizes in enumerate(groups_per_block)) + self.specific_bytes

    def size(self, groups_per_block: Sequence[Sequence[int]]) -> float:
        """Size in model units of an assignment given as group sizes per block."""
        return self.unit.of(self.total_bytes(groups_per_block))
