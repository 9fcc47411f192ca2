"""The paper's baselines at sizes k× (k = M .. 1): Channel Merging and whole-model clustering.

Both work on cosine matrices only. Channel Merging clusters the M task vectors of every block
separately with spherical k-means (cosine distance), computed as kernel k-means on the cosine
matrix; whole-model clustering is agglomerative clustering of the whole-model cosine matrix,
which is the greedy planner run on a single block.
"""

from __future__ import annotations

import numpy as np

from flexmerge.planning.greedy import ConstituentLinkage, run_greedy
from flexmerge.planning.path import Assignment, Group


def channel_assignments(cos: np.ndarray, seed: int = 0, n_init: int = 10) -> list[Assignment]:
    """Per block k-means with cosine distance, for k = M, M-1, ..., 1 (point p has k = M - p)."""
    num_blocks, m, _ = cos.shape
    out = []
    for k in range(m, 0, -1):
        rng = np.random.default_rng(seed + k)
        out.append(Assignment(tuple(_groups(spherical_kmeans(cos[b], k, rng, n_init)) for b in range(num_blocks))))
    return out


def cluster_assignments(cos_total: np.ndarray, num_blocks: int, linkage: str) -> list[Assignment]:
    """Agglomerative clustering of whole models; every block gets the same grouping."""
    m = cos_total.shape[0]
    steps = run_greedy(ConstituentLinkage(cos_total[None], linkage))
    groups: list[set[Group]] = [{(t,) for t in range(m)}]
    for _, left, right, _ in steps:
        g = set(groups[-1]) - {left, right}
        g.add(tuple(sorted(left + right)))
        groups.append(g)
    return [Assignment(tuple(tuple(sorted(g)) for _ in range(num_blocks))) for g in groups]


def spherical_kmeans(cos: np.ndarray, k: int, rng: np.random.Generator, n_init: int = 10,
                     max_iter: int = 100) -> np.ndarray:
    """Labels (M,) of k non-empty clusters minimizing Σ (1 − cos(x_i, centroid)), best of n_init."""
    m = cos.shape[0]
    if k >= m:
        return np.arange(m)
    best_labels, best_cost = None, np.inf
    for _ in range(n_init):
        labels = _nearest(cos, _kmeanspp(cos, k, rng))
        for _ in range(max_iter):
            sim = _centroid_similarity(cos, labels, k)
            new = _fill_empty(sim.argmax(1), sim, k)
            if np.array_equal(new, labels):
                break
            labels = new
        cost = float((1 - _centroid_similarity(cos, labels, k)[np.arange(m), labels]).sum())
        if cost < best_cost - 1e-12:
            best_labels, best_cost = labels, cost
    return best_labels


def _kmeanspp(cos: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    centers = [int(rng.integers(cos.shape[0]))]
    while len(centers) < k:
        dist = np.clip(1 - cos[:, centers].max(1), 0, None)
        dist[centers] = 0
        p = dist**2 / (dist**2).sum() if (dist**2).sum() > 0 else None
        choice = rng.choice(cos.shape[0], p=p) if p is not None else rng.choice(
            [i for i in range(cos.shape[0]) if i not in centers])
        centers.append(int(choice))
    return centers


def _nearest(cos: np.ndarray, centers: list[int]) -> np.ndarray:
    labels = cos[:, centers].argmax(1)
    labels[centers] = np.arange(len(centers))
    return labels


def _centroid_similarity(cos: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(M, k) cosine of each point with each cluster's mean direction, from the cosine matrix."""
    sim = np.full((cos.shape[0], k), -np.inf)
    for c in range(k):
        idx = np.flatnonzero(labels == c)
        if idx.size == 0:
            continue
        norm = np.sqrt(max(cos[np.ix_(idx, idx)].sum(), 1e-300))
        sim[:, c] = cos[:, idx].sum(1) / norm
    return sim


def _fill_empty(labels: np.ndarray, sim: np.ndarray, k: int) -> np.ndarray:
    """Give every empty cluster the point that fits its own cluster worst."""
    labels = labels.copy()
    for c in range(k):
        if not (labels == c).any():
            fit = sim[np.arange(len(labels)), labels]
            movable = [i for i in np.argsort(fit) if (labels == labels[i]).sum() > 1]
            labels[movable[0]] = c
    return labels


def _groups(labels: np.ndarray) -> tuple[Group, ...]:
    return tuple(sorted(tuple(int(i) for i in np.flatnonzero(labels == c)) for c in np.unique(labels)))
