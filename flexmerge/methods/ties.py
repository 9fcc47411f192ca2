from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from flexmerge.methods.base import GroupResult, MergeMethod, MethodParams, register
from flexmerge.methods.kernels import disjoint_mean, disjoint_sum, elect_sign
from flexmerge.preprocess import TopKTrim, Transform


class TiesParams(MethodParams):
    keep: float = Field(0.2, gt=0.0, le=1.0, description="fraction of largest-magnitude entries kept per task (global)")
    lam: float = Field(1.0, description="scaling λ of the merged vector")
    trim: Literal["reference", "exact", "floor"] = Field(
        "reference", description="'reference': keep |τ| >= the (D − int(keep·D))-th smallest, as the TIES code "
        "(int(keep·D)+1 entries, more on ties); 'exact': round(keep·D) entries, the paper's top-k%; "
        "'floor': int(keep·D) entries, as mergekit")
    trim_scope: Literal["model", "tensor"] = Field(
        "model", description="'model': the top entries of the whole task vector (TIES paper, FlexMerge); "
        "'tensor': of each tensor on its own (mergekit)")
    combine: Literal["mean", "sum"] = Field(
        "mean", description="'mean': disjoint mean of the entries agreeing with the elected sign (TIES; mergekit's "
        "normalize: true); 'sum': their sum (mergekit's normalize: false, the default of its dare_ties)")


@register
class Ties(MergeMethod):
    """TIES-Merging (Yadav et al., 2023): trim, elect sign, disjoint mean."""

    name = "ties"
    elementwise = True
    summary = "trim to top-K% magnitudes per task (global), elect signs, disjoint mean, scale by λ"
    reference = "https://arxiv.org/abs/2306.01708"
    Params = TiesParams

    def transforms(self) -> list[Transform]:
        """DARE (if on), then the global trim; keep=1 keeps every entry, so it needs no trimming pass."""
        trim = [TopKTrim(self.p.keep, self.p.trim, self.p.trim_scope)] if self.p.keep < 1.0 else []
        return [*super().transforms(), *trim]

    def merge(self, deltas: torch.Tensor) -> GroupResult:
        combine = disjoint_mean if self.p.combine == "mean" else disjoint_sum
        return GroupResult(self.p.lam * combine(deltas, elect_sign(deltas)))
