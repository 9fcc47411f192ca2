from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field

from flexmerge.blocks import PartView
from flexmerge.methods.base import BlockChunks, GroupResult, MergeMethod, MethodParams, register
from flexmerge.methods.kernels import sign_masks


class EmrParams(MethodParams):
    rescale: Literal["tensor_means", "entries"] = Field(
        "tensor_means", description="'tensor_means': Σ_tensors mean|τ_t| / Σ_tensors mean|m_t⊙τ_uni|, as the EMR "
        "authors' code (and FusionBench, and FlexMerge's loop per block); 'entries': the same ratio of sums "
        "over the block's entries, the paper's formula")


@register
class Emr(MergeMethod):
    """EMR-Merging (Huang et al., 2024): elect, mask, rescale.

    Unified vector: elected sign (of the summed vectors, zero counting as negative as in the
    official code) times the largest agreeing magnitude. Per member: a sign-agreement mask and a
    rescaler. The rescaler follows the authors' code by default: for each tensor of the block the
    mean of |τ_t| and of |mask_t ⊙ τ_uni|, summed over the tensors, and their ratio (so a small
    tensor weighs as much as a large one); `rescale="entries"` takes the ratio of the sums over
    all the block's entries instead, as the paper writes it.
    """

    name = "emr"
    summary = "unified vector (elected sign x max agreeing magnitude) + per-task masks and rescalers"
    reference = "https://arxiv.org/abs/2405.17461"
    Params = EmrParams
    uses_masks = True
    uses_scales = True

    def merge(self, deltas: torch.Tensor) -> GroupResult:
        return self.merge_chunks([(0, deltas)], [PartView("block", (deltas.shape[1],))])

    def merge_chunks(self, chunks: BlockChunks, parts: Sequence[PartView]) -> GroupResult:
        """Unified vector and masks per chunk; rescalers from per-tensor sums accumulated over the
        chunks (exact in chunks: a mean over a tensor is its sum over the tensor's numel)."""
        results, own, kept = [], None, None
        for p, deltas in chunks:
            sign = torch.where(deltas.sum(0) > 0, 1.0, -1.0)
            masks = sign_masks(deltas, sign)
            unified = (deltas.abs() * masks).amax(0) * sign
            weight = 1.0 / parts[p].numel if self.p.rescale == "tensor_means" else 1.0
            own_c = deltas.abs().double().sum(1) * weight
            kept_c = (unified.abs() * masks).double().sum(1) * weight
            own, kept = (own_c, kept_c) if own is None else (own + own_c, kept + kept_c)
            results.append(GroupResult(unified, masks=masks))
        scales = torch.where(kept > 0, own / kept.clamp_min(1e-300), torch.zeros_like(own)).float()
        result = GroupResult.concat(results)
        result.scales = scales
        return result
