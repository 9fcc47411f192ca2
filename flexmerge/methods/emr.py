from __future__ import annotations

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
        sign = torch.where(deltas.sum(0) > 0, 1.0, -1.0)
        masks = sign_masks(deltas, sign)
        unified = (deltas.abs() * masks).amax(0) * sign
        own = deltas.abs().mean(1)
        kept = (unified.abs() * masks).mean(1)
        scales = torch.where(kept > 0, own / kept.clamp_min(1e-30), torch.zeros_like(own))
        return GroupResult(unified, masks=masks, scales=scales)
