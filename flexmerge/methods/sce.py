from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from flexmerge.blocks import PartView
from flexmerge.methods import generalized as gta
from flexmerge.methods.base import GroupResult, MethodParams, StructuredMethod, register
from flexmerge.methods.kernels import agrees


class SceParams(MethodParams):
    select_topk: float = Field(1.0, ge=0.0, le=1.0, description="fraction of each tensor's entries kept: those whose "
                               "values vary most across the members (1 = all, mergekit's default)")


@register
class Sce(StructuredMethod):
    """SCE (Wan et al., FuseChat, 2024) as mergekit's `sce`, per tensor: Select the entries whose
    values vary most across the members (`select_topk`), Calculate each member's weight as its
    mean squared task vector over the tensor (normalized to sum 1), Erase the entries whose sign
    disagrees with the elected one (TIES' election), then the weighted mean of what is left."""

    name = "sce"
    summary = "per tensor: keep the highest-variance entries, weight members by mean τ², elect signs, weighted mean"
    reference = "https://arxiv.org/abs/2408.07990"
    Params = SceParams

    def merge_parts(self, deltas: list[torch.Tensor], parts: Sequence[PartView]) -> GroupResult:
        return GroupResult(torch.cat([self.merge_tensor(d).flatten() for d in deltas]))

    def merge_tensor(self, taus: torch.Tensor) -> torch.Tensor:
        """The merge of one tensor's (n, ...) task vectors (mergekit's `sce_merge`)."""
        if self.p.select_topk < 1:
            taus = taus * variance_mask(taus, self.p.select_topk)
        erase = agrees(taus, gta.elect(taus, "sum"))
        w = member_weights(taus).view(-1, *[1] * (taus.dim() - 1)) * erase
        return (taus * w).sum(0) / w.sum(0).clamp(min=1e-6)


def variance_mask(taus: torch.Tensor, density: float) -> torch.Tensor:
    """1 on the int(density · #non-zero-variance) entries whose values vary most across the members."""
    var = torch.var(taus, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)
    mask = torch.zeros_like(var)
    if k > 0:
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


def member_weights(taus: torch.Tensor) -> torch.Tensor:
    """Each member's mean squared task vector over the tensor, normalized to sum 1 (1/n each when
    they all but vanish)."""
    w = taus.square().reshape(taus.shape[0], -1).mean(dim=1)
    total = float(w.sum())
    return torch.full_like(w, 1.0 / w.numel()) if abs(total) < 1e-6 else w / total
