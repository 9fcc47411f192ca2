"""Merged-vector similarity: compare groups by their current merged vectors, not their members.

For linear methods (average, Task Arithmetic) the merged vector is Σ w_i τ_i, so every dot
product follows from the block Gram matrix G: <A, B> = w_Aᵀ G w_B, and nothing is re-read.
Other methods (TIES, PCB, EMR, ...) need the vectors: the fused group's merged vector is
computed once and compared with the other groups of its block only. That mode holds every
block's task vectors in memory (M models' worth).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from flexmerge.errors import UnknownNameError
from flexmerge.blocks import PartView
from flexmerge.methods.base import MergeMethod

MEASURES = ("cosine", "euclidean", "sign")


def _check(measure: str) -> None:
    if measure not in MEASURES:
        raise UnknownNameError("merged-vector measure", measure, MEASURES)


def _from_dots(ab: float, aa: float, bb: float, measure: str) -> float:
    if measure == "euclidean":
        return -math.sqrt(max(aa + bb - 2 * ab, 0.0))
    if aa <= 0 and bb <= 0:
        return 1.0
    if aa <= 0 or bb <= 0:
        return 0.0
    return max(-1.0, min(1.0, ab / math.sqrt(aa * bb)))


class _PairwiseRescorer:
    """Shared loop: initial all-pairs scores and the fused group's row, from `score`."""

    num_blocks: int
    num_tasks: int

    def score(self, b: int, left: list[int], right: list[int]) -> float:
        raise NotImplementedError

    def initial(self) -> np.ndarray:
        m = self.num_tasks
        sim = np.full((self.num_blocks, m, m), -np.inf)
        for b in range(self.num_blocks):
            for i in range(m):
                for j in range(i + 1, m):
                    sim[b, i, j] = self.score(b, [i], [j])
        return sim

    def rescore(self, b: int, i: int, members: list[list[int]], rows: np.ndarray,
                fused_sizes: tuple[int, int]) -> np.ndarray:
        new = np.full(self.num_tasks, -np.inf)
        for k, mem in enumerate(members):
            if mem and k != i:
                new[k] = self.score(b, members[i], mem)
        return new


class GramMerged(_PairwiseRescorer):
    """Merged-vector cosine or Euclidean similarity of a linear method, from Gram matrices."""

    def __init__(self, grams: np.ndarray, method: MergeMethod, measure: str):
        _check(measure)
        if measure == "sign" or method.linear_weights(2) is None:
            raise ValueError("GramMerged needs a linear method and cosine/euclidean")
        self.grams, self.method, self.measure = grams, method, measure
        self.num_blocks, self.num_tasks = grams.shape[0], grams.shape[1]

    def _weights(self, members: list[int]) -> np.ndarray:
        w = np.zeros(self.num_tasks)
        w[members] = self.method.for_group(members).linear_weights(len(members)).numpy()
        return w

    def score(self, b: int, left: list[int], right: list[int]) -> float:
        g = self.grams[b]
        wa, wb = self._weights(left), self._weights(right)
        return _from_dots(float(wa @ g @ wb), float(wa @ g @ wa), float(wb @ g @ wb), self.measure)


class VectorMerged(_PairwiseRescorer):
    """Merged-vector similarity of any method, from the block task vectors held in memory."""

    def __init__(self, vectors: list[torch.Tensor], method: MergeMethod, measure: str, parts: list[list[PartView]],
                 bases: list[torch.Tensor] | None = None):
        _check(measure)
        self.vectors, self.method, self.measure, self.parts = vectors, method, measure, parts
        self.bases = bases  # per block, θ0 flattened (fp32): for methods that read it (`needs_base`)
        self.num_blocks, self.num_tasks = len(vectors), vectors[0].shape[0]
        self._cache: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}

    def merged(self, b: int, members: list[int]) -> torch.Tensor:
        key = (b, tuple(members))
        if key not in self._cache:
            d = self.vectors[b][members]
            self._cache[key] = d[0] if len(members) == 1 else self._merge(b, members, d)
        return self._cache[key]

    def _merge(self, b: int, members: list[int], d: torch.Tensor) -> torch.Tensor:
        """The merged task vector of `members` on block b (a method that reads θ0 gets it last)."""
        group = self.method.for_group(members)
        if group.needs_base:
            if self.bases is None:
                raise ValueError(f"method {self.method.name!r} reads θ0: give VectorMerged the blocks' bases")
            d = torch.cat([d, self.bases[b].view(1, -1)])
        return group.merge_flat(d, self.parts[b]).delta

    def score(self, b: int, left: list[int], right: list[int]) -> float:
        a, c = self.merged(b, left), self.merged(b, right)
        if self.measure == "sign":
            return float((torch.sign(a) == torch.sign(c)).double().mean())
        a64, c64 = a.double(), c.double()
        return _from_dots(float(a64 @ c64), float(a64 @ a64), float(c64 @ c64), self.measure)
