"""The greedy merge path (FlexMerge, Algorithm 1) and its block-order ablations.

State per block: an (M, M) matrix whose entry [i, j] (i < j, both group representatives = the
group's smallest task index) is the similarity of groups i and j; everything else is -inf.
Each step takes the largest entry over all blocks (first one on ties: lowest block, then
lowest i, then j), fuses j into i, and rewrites row i only. With constituent similarity the
new row follows from the two old rows (Lance-Williams), so a step costs O(B·M²) for the argmax
and O(M) for the update; the merging algorithm never runs while planning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from flexmerge.errors import UnknownNameError

LINKAGES = ("min", "avg", "max")
ORDERS = ("greedy", "left-right", "right-left", "random")
NEG = -np.inf

RawStep = tuple[int, tuple[int, ...], tuple[int, ...], float]


class Rescorer(Protocol):
    """New similarities of the fused group i (of block b) with every representative k."""

    def initial(self) -> np.ndarray: ...  # (B, M, M) similarities of singletons
    def rescore(self, b: int, i: int, members: list[list[int]], rows: np.ndarray,
                fused_sizes: tuple[int, int]) -> np.ndarray: ...


class ConstituentLinkage:
    """Similarity of two groups = min / mean / max of the cosines of their members' cross pairs."""

    def __init__(self, cos: np.ndarray, linkage: str):
        if linkage not in LINKAGES:
            raise UnknownNameError("linkage", linkage, LINKAGES)
        self.cos, self.linkage = cos, linkage

    def initial(self) -> np.ndarray:
        return self.cos.astype(np.float64, copy=True)

    def rescore(self, b: int, i: int, members: list[list[int]], rows: np.ndarray,
                fused_sizes: tuple[int, int]) -> np.ndarray:
        ri, rj = rows
        if self.linkage == "min":
            return np.minimum(ri, rj)
        if self.linkage == "max":
            return np.maximum(ri, rj)
        ni, nj = fused_sizes
        return (ni * ri + nj * rj) / (ni + nj)


def run_greedy(rescorer: Rescorer, order: str = "greedy", seed: int = 0) -> list[RawStep]:
    """Fuse groups until every block holds one group; returns (block, left, right, similarity)."""
    if order not in ORDERS:
        raise UnknownNameError("order", order, ORDERS)
    sim = rescorer.initial()
    num_blocks, m, _ = sim.shape
    upper = np.triu(np.ones((m, m), dtype=bool), 1)
    sim = np.where(upper, sim, NEG)
    members = [[[t] for t in range(m)] for _ in range(num_blocks)]
    remaining = [m - 1] * num_blocks
    rng = np.random.default_rng(seed)
    pick_block = _block_picker(order, remaining, rng)
    steps: list[RawStep] = []
    for _ in range(num_blocks * (m - 1)):
        b = pick_block()
        if b is None:
            flat = int(np.argmax(sim))
            b, rest = divmod(flat, m * m)
        else:
            rest = int(np.argmax(sim[b]))
        i, j = divmod(rest, m)
        steps.append((b, tuple(members[b][i]), tuple(members[b][j]), float(sim[b, i, j])))
        rows = np.stack([_row(sim[b], i), _row(sim[b], j)])
        fused_sizes = (len(members[b][i]), len(members[b][j]))
        members[b][i] = sorted(members[b][i] + members[b][j])
        members[b][j] = []
        new = rescorer.rescore(b, i, members[b], rows, fused_sizes)
        sim[b, j, :] = NEG
        sim[b, :, j] = NEG
        for k in range(m):
            if k != i and members[b][k]:
                sim[b, min(i, k), max(i, k)] = new[k]
        remaining[b] -= 1
    return steps


def _row(mat: np.ndarray, i: int) -> np.ndarray:
    """Similarities of representative i with every other one, read from the upper triangle."""
    return np.maximum(mat[i, :], mat[:, i])


def _block_picker(order: str, remaining: list[int], rng: np.random.Generator) -> Callable[[], int | None]:
    def pick() -> int | None:
        open_blocks = [b for b, r in enumerate(remaining) if r > 0]
        if order == "left-right":
            return open_blocks[0]
        if order == "right-left":
            return open_blocks[-1]
        return int(rng.choice(open_blocks))

    return (lambda: None) if order == "greedy" else pick
