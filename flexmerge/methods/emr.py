from __future__ import annotations

from collections.abc import Iterable

import torch

from flexmerge.methods.base import GroupResult, MergeMethod, register
from flexmerge.methods.kernels import sign_masks


@register
class Emr(MergeMethod):
    """EMR-Merging (Huang et al., 2024): elect, mask, rescale.

    Unified vector: elected sign (of the summed vectors, zero counting as negative as in the
    official code) times the largest agreeing magnitude. Per member: a sign-agreement mask and a
    rescaler mean|τ_t| / mean|mask_t ⊙ τ_uni| over the block.
    """

    name = "emr"
    summary = "unified vector (elected sign x max agreeing magnitude) + per-task masks and rescalers"
    reference = "https://arxiv.org/abs/2405.17461"
    uses_masks = True
    uses_scales = True

    def merge(self, deltas: torch.Tensor) -> GroupResult:
        return self.merge_chunks([deltas])

    def merge_chunks(self, chunks: Iterable[torch.Tensor]) -> GroupResult:
        """Unified vector and masks per chunk; rescalers from block-wide sums (exact in chunks:
        a ratio of means over the same entries is a ratio of sums)."""
        parts, own, kept = [], 0.0, 0.0
        for deltas in chunks:
            sign = torch.where(deltas.sum(0) > 0, 1.0, -1.0)
            masks = sign_masks(deltas, sign)
            unified = (deltas.abs() * masks).amax(0) * sign
            own = own + deltas.abs().double().sum(1)
            kept = kept + (unified.abs() * masks).double().sum(1)
            parts.append(GroupResult(unified, masks=masks))
        scales = torch.where(kept > 0, own / kept.clamp_min(1e-300), torch.zeros_like(own)).float()
        result = GroupResult.concat(parts)
        result.scales = scales
        return result
