"""Small pure tensor operations the merging methods are built from. All act on (n, D) fp32."""

from __future__ import annotations

import torch

from flexmerge._scratch import TEMP_A, scratch

SCRATCH_MAX = 1 << 25  # larger temporaries (whole blocks in merged-vector planning) are not kept


def _temp(name: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A temporary shaped as `like`: a reused per-thread buffer for chunk-sized work (a fresh
    multi-MB tensor page-faults on every page), a plain new tensor beyond SCRATCH_MAX; on
    `like`'s device."""
    if like.numel() > SCRATCH_MAX:
        return torch.empty(like.shape, dtype=dtype, device=like.device)
    return scratch(name, tuple(like.shape), dtype, like.device)


def elect_sign(deltas: torch.Tensor) -> torch.Tensor:
    """Per entry, the sign of the summed values; an exact tie (sum 0) elects +.

    (The TIES code breaks such ties by the majority sign of the whole model; a fixed choice keeps
    the election per entry, so chunked merging is exact. Ties need exact cancellation: rare.)"""
    return torch.where(deltas.sum(0) >= 0, 1.0, -1.0)


def agrees(deltas: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Entries whose value is non-zero and has the elected sign."""
    return torch.where(sign > 0, deltas > 0, deltas < 0)


def disjoint_mean(deltas: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Mean over the members that agree with the elected sign (TIES' disjoint merge)."""
    # agrees() as 0/1 floats (sign is ±1): float products run ~5x faster than bool masks, and
    # deltas * 1.0 / * 0.0 are the values (signed zeros included) of deltas * bool_mask. One
    # temporary: the mask is counted first, then multiplied in place (keep * d == d * keep).
    keep = torch.mul(deltas, sign, out=_temp(TEMP_A, deltas, deltas.dtype)).gt_(0)
    count = keep.sum(0).clamp_min_(1)
    return keep.mul_(deltas).sum(0).div_(count)


def disjoint_sum(deltas: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Sum over the members that agree with the elected sign (mergekit's TIES with normalize: false)."""
    return (deltas * agrees(deltas, sign)).sum(0)


def minmax_normalize(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    lo = x.amin(dim, keepdim=True)
    hi = x.amax(dim, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def clamp_rows(x: torch.Tensor, low_ratio: float, high_ratio: float) -> torch.Tensor:
    """Clamp each row to its own rank quantiles: below index ⌊D·low⌋ and above ⌊D·(1−high)⌋−1."""
    d = x.shape[-1]
    lo_idx = min(d - 1, int(d * low_ratio))
    hi_idx = min(d - 1, max(lo_idx, int(d * (1 - high_ratio)) - 1))
    lo = x.kthvalue(lo_idx + 1, dim=-1, keepdim=True).values
    hi = x.kthvalue(hi_idx + 1, dim=-1, keepdim=True).values
    return torch.maximum(torch.minimum(x, hi), lo)


def sign_masks(deltas: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Per member, the entries whose sign agrees with `sign` (EMR's task masks)."""
    return deltas * sign > 0


def running_mean(deltas: torch.Tensor) -> torch.Tensor:
    """m = τ_0; m += (τ_i − m) / (i + 1): FusionBench's mean of non-2-D tensors in its SVD methods
    (not bitwise equal to sum / n, hence its own kernel)."""
    m = deltas[0].clone()
    for i in range(1, deltas.shape[0]):
        m += (deltas[i] - m) / (i + 1)
    return m


def left_sum(deltas: torch.Tensor) -> torch.Tensor:
    """Σ_i τ_i added left to right, as Python's `sum` over the members does."""
    total = deltas[0].clone()
    for i in range(1, deltas.shape[0]):
        total += deltas[i]
    return total


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor U·Vᵀ of x (the nearest matrix with orthonormal rows/columns)."""
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh
