from __future__ import annotations

import torch
from pydantic import Field

from flexmerge.methods import generalized as gta
from flexmerge.methods.base import GroupResult, MergeMethod, WeightedParams, register


class LinearParams(WeightedParams):
    normalize: bool = Field(True, description="divide by Σ w_i (a weighted average, mergekit's default); "
                            "false: Σ w_i θ_i, the models' weighted sum")


@register
class Linear(MergeMethod):
    """mergekit's `linear`: the members' weighted average Σ w_i θ_i / Σ w_i (a model soup), which is
    θ0 + Σ w_i τ_i / Σ w_i: generalized task arithmetic's weighted mean at λ = 1. Without `normalize`
    it is the weighted sum of the models, Σ w_i θ_i = θ0 + Σ w_i τ_i + (Σ w_i − 1)·θ0, which reads θ0."""

    name = "linear"
    elementwise = True
    summary = "weighted average of the models, Σ w_i θ_i / Σ w_i (mergekit's linear; weights per task)"
    reference = "https://arxiv.org/abs/2203.05482"
    Params = LinearParams

    @property
    def merges_weights(self) -> bool:
        return True

    @property
    def needs_base(self) -> bool:
        return not self.p.normalize

    @property
    def config(self) -> gta.GTAConfig:
        return gta.GTAConfig(dare=self.p.dare, seed=self.p.seed, combine="mean" if self.p.normalize else "sum")

    def transforms(self):
        return self.config.transforms()

    def merge(self, deltas: torch.Tensor) -> GroupResult:
        taus = deltas[:-1] if self.needs_base else deltas
        n = taus.shape[0]
        weights = self.member_weights(n, deltas.device)
        w = torch.ones(n, dtype=torch.float64, device=deltas.device) if weights is None else weights
        merged = gta.weighted_merge(taus, self.config, w)
        if self.needs_base:  # Σ w θ = θ0 + Σ w τ + (Σ w − 1) θ0
            merged.add_(deltas[-1], alpha=float(w.sum()) - 1.0)
        return GroupResult(merged)

    def linear_weights(self, n: int, device: torch.device | None = None) -> torch.Tensor | None:
        if self.needs_base:  # affine in θ0 unless Σ w = 1: not a combination of the task vectors
            return None
        w = self.member_weights(n, device) if self.p.weights is not None and self._members is not None else None
        return gta.linear_weights(torch.ones(n, dtype=torch.float64, device=device) if w is None else w, "mean", 1.0)
