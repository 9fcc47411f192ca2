"""Unit matching by activation correlation (Hungarian assignment), and the merged/private split.

The correlation of every unit of model a with every unit of model b is accumulated over the
calibration batches from running sums (memory: O(units^2) per group, not O(samples)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class CorrelationStats:
    """Streaming Pearson correlation between the columns of two feature matrices."""

    def __init__(self, n: int):
        self.count = 0
        self.sa = torch.zeros(n, dtype=torch.float64)
        self.sb = torch.zeros(n, dtype=torch.float64)
        self.saa = torch.zeros(n, dtype=torch.float64)
        self.sbb = torch.zeros(n, dtype=torch.float64)
        self.sab = torch.zeros(n, n, dtype=torch.float64)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double()
        self.count += a.shape[0]
        self.sa += a.sum(0)
        self.sb += b.sum(0)
        self.saa += (a * a).sum(0)
        self.sbb += (b * b).sum(0)
        self.sab += a.T @ b

    def correlation(self) -> torch.Tensor:
        """(n, n): entry [i, j] = corr(unit i of a, unit j of b); constant units correlate 0."""
        n = max(self.count, 1)
        ma, mb = self.sa / n, self.sb / n
        cov = self.sab / n - torch.outer(ma, mb)
        sd_a = (self.saa / n - ma * ma).clamp_min(0).sqrt()
        sd_b = (self.sbb / n - mb * mb).clamp_min(0).sqrt()
        return cov / torch.outer(sd_a, sd_b).clamp_min(1e-12)


def hungarian(score: torch.Tensor) -> torch.Tensor:
    """perm with perm[i] = the unit of b matched to unit i of a, maximizing the total score."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(score.double().numpy(), maximize=True)
    perm = torch.empty(score.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm


def block_hungarian(scores: list[torch.Tensor], block: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Units matched in whole blocks of `block` consecutive units (attention heads, GroupNorm groups).

    scores: (n, n) similarities of a's units with b's, one or more kinds sharing one block permutation.
    A block pair's score is the sum over `scores` of its best within-block assignment; the Hungarian
    over those picks the blocks. Returns (block perm, per score the within-block perms (n_blocks, block)
    of a's blocks, indices into the matched b block)."""
    n = scores[0].shape[0] // block
    sub = lambda m, i, j: m[i * block:(i + 1) * block, j * block:(j + 1) * block]  # noqa: E731
    total = torch.zeros(n, n, dtype=torch.float64)
    inner: dict[tuple[int, int], list[torch.Tensor]] = {}
    rows = torch.arange(block)
    for i in range(n):
        for j in range(n):
            inner[i, j] = [hungarian(sub(m, i, j)) for m in scores]
            total[i, j] = sum(float(sub(m, i, j)[rows, p].sum()) for m, p in zip(scores, inner[i, j]))
    perm = hungarian(total)
    return perm, [torch.stack([inner[i, int(perm[i])][k] for i in range(n)]) for k in range(len(scores))]


def unit_perm(perm: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """A block matching as a unit permutation: for a's block i, the units of b's block perm[i] in the order inner[i]."""
    block = inner.shape[1]
    return torch.cat([int(perm[i]) * block + inner[i] for i in range(len(perm))])


def chunk_hungarian(score: torch.Tensor, chunk: int) -> torch.Tensor:
    """perm[i] = b's unit matched to a's unit i, maximizing the total score, whole chunks to whole chunks."""
    if chunk == 1:
        return hungarian(score)
    perm, (inner,) = block_hungarian([score], chunk)
    return unit_perm(perm, inner)


@dataclass(frozen=True)
class Split:
    """One group's layout in the merged model: [merged | a private | b private].

    a_order/b_order list the original unit indices in that layout: a_order[:m] and b_order[:m]
    are merged pairwise; a_order[m:] and b_order[m:] are kept private (p = n - m each)."""

    a_order: torch.Tensor
    b_order: torch.Tensor
    merged: int

    @property
    def private(self) -> int:
        return len(self.a_order) - self.merged

    @property
    def width(self) -> int:
        return self.merged + 2 * self.private


def split(perm: torch.Tensor, quality: torch.Tensor, merged: int, chunk: int = 1) -> Split:
    """Merge the `merged` best-matching pairs (highest quality), keep the others private; with chunks,
    rank a's chunks (consecutive runs of `chunk` units) by their mean quality and keep each whole."""
    if merged % chunk:
        raise ValueError(f"{merged} merged units is not a whole number of chunks of {chunk}")
    chunks = torch.argsort(quality.reshape(-1, chunk).mean(1), descending=True, stable=True)
    order = (chunks[:, None] * chunk + torch.arange(chunk)).reshape(-1)
    return Split(order, perm[order], merged)


def chunk_quality(quality: torch.Tensor, chunk: int) -> list[float]:
    """Each chunk's mean pair quality, best first (what the greedy schedule ranks a chunked group by)."""
    return sorted(quality.reshape(-1, chunk).mean(1).tolist(), reverse=True)


def pair_quality(corr: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Correlation of each unit of a with its partner in b."""
    return corr[torch.arange(len(perm)), perm]


def _unit_rows(w: torch.Tensor, axis: int) -> torch.Tensor:
    """A tensor as one row per unit of `axis` (every other axis flattened)."""
    return w.movedim(axis, 0).reshape(w.shape[axis], -1).double()


def weight_matching(groups: dict[str, list[tuple[str, int]]], axes_of, sa: dict[str, torch.Tensor],
                    sb: dict[str, torch.Tensor], rounds: int = 100, seed: int = 0,
                    chunks: dict[str, int] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Git Re-Basin weight matching: per group, the Hungarian assignment maximizing Σ <a's unit i, b's unit j>
    over every tensor axis the group permutes, with b's other axes aligned by the other groups' current
    permutations. As the reference's `weight_matching`: each round visits the groups in a random order
    (seeded), and the rounds stop when no group's objective rose by more than 1e-12, or after `rounds`.

    Returns (perm, quality) per group: perm[i] = b's unit matched to a's unit i, quality = the cosine of
    the two units' concatenated weight vectors (what the greedy schedule ranks by). A group with a chunk
    size (chunks[g] > 1) is matched whole chunks to whole chunks (`chunk_hungarian`)."""
    perms = {g: torch.arange(sa[axes[0][0]].shape[axes[0][1]]) for g, axes in groups.items()}

    def aligned(g: str) -> tuple[torch.Tensor, torch.Tensor]:
        ra, rb = [], []
        for key, axis in groups[g]:
            wb = sb[key]
            for other, h in axes_of(key).items():
                if other != axis:
                    wb = wb.index_select(other, perms[h])
            ra.append(_unit_rows(sa[key], axis))
            rb.append(_unit_rows(wb, axis))
        return torch.cat(ra, 1), torch.cat(rb, 1)

    names, rng = list(groups), torch.Generator().manual_seed(seed)
    for _ in range(rounds):
        progress = False
        for k in torch.randperm(len(names), generator=rng).tolist():
            g = names[k]
            ra, rb = aligned(g)
            score = ra @ rb.T
            new = chunk_hungarian(score, (chunks or {}).get(g, 1))
            rows = torch.arange(len(new))
            progress |= bool(score[rows, new].sum() > score[rows, perms[g]].sum() + 1e-12)
            perms[g] = new
        if not progress:
            break
    quality = {}
    for g in groups:
        ra, rb = aligned(g)
        quality[g] = torch.nn.functional.cosine_similarity(ra, rb[perms[g]], dim=1)
    return perms, quality
