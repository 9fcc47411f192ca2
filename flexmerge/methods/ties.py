from __future__ import annotations

import torch
from pydantic import Field

from flexmerge.methods import generalized as gta
from flexmerge.methods.base import GroupResult, MergeMethod, WeightedParams, register
from flexmerge.preprocess import Transform


class TiesParams(WeightedParams):
    keep: float = gta.keep_field()
    lam: float = Field(1.0, description="scaling λ of the merged vector")
    trim: gta.TrimRule = gta.trim_field()
    trim_scope: gta.TrimScope = gta.trim_scope_field()
    combine: gta.Combine = gta.combine_field()


@register
class Ties(MergeMethod):
    """TIES-Merging (Yadav et al., 2023): trim, elect sign, disjoint mean (`GTAConfig.ties`)."""

    name = "ties"
    elementwise = True
    summary = "trim to top-K% magnitudes per task (global), elect signs, disjoint mean, scale by λ"
    reference = "https://arxiv.org/abs/2306.01708"
    Params = TiesParams

    @property
    def config(self) -> gta.GTAConfig:
        return gta.GTAConfig.ties(self.p, self.p.lam)

    def transforms(self) -> list[Transform]:
        """DARE (if on), then the global trim."""
        return self.config.transforms()

    def merge(self, deltas: torch.Tensor) -> GroupResult:
        return GroupResult(gta.merge(deltas, self.config, self.member_weights(deltas.shape[0], deltas.device)))
