from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from flexmerge.methods.base import GroupResult, MergeMethod, MethodParams, register
from flexmerge.methods.kernels import disjoint_mean, elect_sign
from flexmerge.preprocess import TopKTrim, Transform


class TiesParams(MethodParams):
    keep: float = Field(0.2, gt=0.0, le=1.0, description="fraction of largest-magnitude entries kept per task (global)")
    lam: float = Field(1.0, description="scaling λ of the merged vector")
    trim: Literal["reference", "exact"] = Field(
        "reference", description="'reference': keep |τ| >= the (D − int(keep·D))-th smallest, as the TIES code "
        "(int(keep·D)+1 entries, more on ties); 'exact': round(keep·D) entries, the paper's top-k%")


@register
class Ties(MergeMethod):
    """TIES-Merging (Yadav et al., 2023): trim, elect sign, disjoint mean."""

    name = "ties"
    elementwise = True
    summary = "trim to top-K% magnitudes per task (global), elect signs, disjoint mean, scale by λ"
    reference = "https://arxiv.org/abs/2306.01708"
    Params = TiesParams

    def transforms(self) -> list[Transform]:
        return [*super().transforms(), TopKTrim(self.p.keep, self.p.trim)]

    def merge(self, deltas: torch.Tensor) -> GroupResult:
        return GroupResult(self.p.lam * disjoint_mean(deltas, elect_sign(deltas)))
