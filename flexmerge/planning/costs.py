"""Cost-driven planning: fuse, at each step, the pair of groups (over all blocks) whose fusion
loses the least of the tasks' fine-tuning, measured as a quadratic form in the task vectors.

A group S of block b stores merged = Σ_{i∈S} w_i τ_i (w: the method's linear weights; methods that
are not linear are scored as the plain mean). Task t ∈ S then sees Δ_t = merged − τ_t, and loses

    cost_t(S) = a_tᵀ K[b, t] a_t / norm_t,   a_t = w_S − e_t,

where K[b, t][i, j] = <τ_i, τ_j> on block b measured in task t's metric: the plain parameter inner
product (data-free) or the change of the block's outputs on task t's calibration inputs
(`activations`). A step fuses the pair with the least cost(A ∪ B) − cost(A) − cost(B), divided by
(size saved)^byte_power. `norm_t` is task t's whole fine-tuning change Σ_b K[b, t][t, t] ("task"), or
per block K[b, t][t, t] ("block", scale-free per block like a cosine).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from flexmerge.blocks import Partition
from flexmerge.errors import UnknownNameError
from flexmerge.planning.activations import TOKENS, Metric
from flexmerge.preprocess import Pipeline
from flexmerge.taskvec import TaskSet

NORMS = ("task", "block")
RawStep = tuple[int, tuple[int, ...], tuple[int, ...], float]
Weights = Callable[[Sequence[int]], np.ndarray]


def parameter_quadratics(grams: np.ndarray) -> np.ndarray:
    """Data-free K (B, M, M, M): every task measures change by the plain inner product."""
    b, m, _ = grams.shape
    return np.broadcast_to(grams[:, None], (b, m, m, m)).copy()


def output_quadratics(tasks: TaskSet, partition: Partition, pipeline: Pipeline,
                      metrics: Sequence[dict[str, Metric]]) -> np.ndarray:
    """Data-aware K (B, M, M, M): K[b, t][i, j] = <τ_i, τ_j> of block b in task t's output metric.

    Parameters no measured layer owns (embeddings, grouped convolutions) use the plain inner product
    times the task's token count, the output change of an input that is a unit vector per token."""
    m = tasks.num_tasks
    quad = np.zeros((len(partition), m, m, m))
    for b, block in enumerate(partition.blocks):
        for p in block.parts:
            for chunk in tasks.chunks(p.key, p.rows):
                d = pipeline.deltas(tasks, chunk).float()
                lo = 0 if chunk.rows is None else chunk.rows[0]
                for t in range(m):
                    y = _measured(d, metrics[t].get(chunk.key, metrics[t][TOKENS]), lo)
                    quad[b, t] += (y @ y.T).double().numpy()
    return quad


def _measured(d: torch.Tensor, metric: Metric, lo: int) -> torch.Tensor:
    """(M, ·) rows whose inner products are the metric's: d·Fᵀ (a conv's (out, C, k, k) rows flattened),
    d·√diag or d·√uniform."""
    m = d.shape[0]
    if metric.factor is not None and d.dim() >= 3:
        return (d.reshape(m, d.shape[1], -1) @ metric.factor.T).reshape(m, -1)
    if metric.diag is not None and d.dim() == 2:
        return d * metric.diag[lo:lo + d.shape[1]].sqrt()
    return d.reshape(m, -1) * metric.uniform**0.5


class QuadraticCost:
    """cost_t(S) of every group from K, the method's weights and the chosen normalization."""

    def __init__(self, quad: np.ndarray, weights: Weights, norm: str = "block"):
        if norm not in NORMS:
            raise UnknownNameError("cost normalization", norm, NORMS)
        self.quad, self.weights = quad, weights
        m = quad.shape[1]
        own = np.stack([quad[:, t, t, t] for t in range(m)], axis=1)  # (B, M): ||τ_t||² in t's metric
        scale = own.sum(0, keepdims=True).repeat(len(quad), 0) if norm == "task" else own
        self.scale = np.where(scale > 0, scale, 1.0)

    def group(self, b: int, members: Sequence[int]) -> float:
        if len(members) == 1:
            return 0.0
        idx = list(members)
        w = self.weights(idx)
        total = 0.0
        for k, t in enumerate(idx):
            a = w.copy()
            a[k] -= 1.0
            total += float(a @ self.quad[b, t][np.ix_(idx, idx)] @ a) / self.scale[b, t]
        return total


def method_weights(method) -> Weights:
    """The method's linear weights of a group (its members' task indices), or the plain mean for
    methods that are not linear."""
    def weights(members: Sequence[int]) -> np.ndarray:
        n = len(members)
        w = method.for_group(members).linear_weights(n)
        return np.full(n, 1.0 / n) if w is None else w.double().numpy()

    return weights


def run_cost_greedy(cost: QuadraticCost, saved: Callable[[int, list[list[int]], int, int], float],
                    byte_power: float = 1.0) -> list[RawStep]:
    """Fuse the cheapest pair, cost / saved^byte_power (1: per unit of size saved, 0: cost alone),
    until each block has one group.

    The recorded similarity is minus the chosen score (higher = fused earlier, as greedy's).
    `saved(b, groups, i, j)` is the size a fusion of groups i and j of block b frees. Ties go to
    the lowest block, then the lowest representatives."""
    num_blocks, m = cost.quad.shape[:2]
    groups = [[[t] for t in range(m)] for _ in range(num_blocks)]
    own = [[0.0] * m for _ in range(num_blocks)]
    score = np.full((num_blocks, m, m), np.inf)

    def rescore(b: int, i: int, j: int) -> None:
        a, c = sorted((i, j))
        merged = sorted(groups[b][a] + groups[b][c])
        delta = cost.group(b, merged) - own[b][a] - own[b][c]
        score[b, a, c] = delta / max(saved(b, groups[b], a, c), 1e-12) ** byte_power if byte_power else delta

    for b in range(num_blocks):
        for i in range(m):
            for j in range(i + 1, m):
                rescore(b, i, j)
    steps: list[RawStep] = []
    for _ in range(num_blocks * (m - 1)):
        b, i, j = np.unravel_index(int(np.argmin(score)), score.shape)
        b, i, j = int(b), int(i), int(j)
        steps.append((b, tuple(groups[b][i]), tuple(groups[b][j]), -float(score[b, i, j])))
        groups[b][i] = sorted(groups[b][i] + groups[b][j])
        groups[b][j] = []
        own[b][i] = cost.group(b, groups[b][i])
        score[b, j, :] = score[b, :, j] = np.inf
        for k in range(m):
            if k != i and groups[b][k]:
                rescore(b, i, k)
    return steps
