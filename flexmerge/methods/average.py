from __future__ import annotations

import torch

from flexmerge.methods.base import GroupResult, MergeMethod, register


@register
class Average(MergeMethod):
    """Weight averaging: the merged weights are θ0 + mean(τ_i)."""

    name = "average"
    elementwise = True
    summary = "mean of the members' task vectors (model soup / weight averaging)"

    def merge(self, deltas: torch.Tensor) -> GroupResult:
        return GroupResult(deltas.mean(0))

    def linear_weights(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        return torch.full((n,), 1.0 / n, dtype=torch.float64, device=device)
