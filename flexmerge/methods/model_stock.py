from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from flexmerge.blocks import PartView
from flexmerge.methods.base import GroupResult, MethodParams, StructuredMethod, register


class ModelStockParams(MethodParams):
    filter_wise: bool = Field(False, description="one interpolation ratio per row (along the last dimension) "
                              "instead of one per tensor")


@register
class ModelStock(StructuredMethod):
    """Model Stock (Jang et al., 2024) as mergekit's `model_stock`, per tensor: with cos θ the mean
    pairwise cosine of the members' task vectors, the merge moves from θ0 toward their average by
    t = n·cos θ / (1 + (n − 1)·cos θ): θ0 + t·mean τ_i (θ0 kept where the denominator vanishes)."""

    name = "model_stock"
    summary = "θ0 + t·mean τ with t from the members' mean pairwise cosine (per tensor, or per row)"
    reference = "https://arxiv.org/abs/2403.19522"
    Params = ModelStockParams

    def merge_parts(self, deltas: list[torch.Tensor], parts: Sequence[PartView]) -> GroupResult:
        return GroupResult(torch.cat([self.merge_tensor(d).flatten() for d in deltas]))

    def merge_tensor(self, taus: torch.Tensor) -> torch.Tensor:
        """t·mean τ of one tensor's (n, ...) task vectors (mergekit's `model_stock_merge_method`)."""
        n, shape = taus.shape[0], taus.shape[1:]
        if not self.p.filter_wise:
            offsets = taus.reshape(n, -1)
        else:
            offsets = taus if len(shape) >= 2 else taus.reshape(n, 1, -1)
        cosines = [((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-6)).clamp(-1, 1)
                   for i, a in enumerate(offsets) for b in offsets[i + 1:]]
        cos = torch.stack(cosines).mean(0).unsqueeze(-1)
        denominator = 1 + (n - 1) * cos
        singular = denominator.abs() < 1e-6
        t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1.0, denominator))
        return (t * (offsets.sum(0) / n)).reshape(shape)
