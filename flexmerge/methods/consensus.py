from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from flexmerge.methods.base import GroupResult, MergeMethod, MethodParams, register
from flexmerge.methods.kernels import disjoint_mean, elect_sign
from flexmerge.preprocess import TopKTrim, Transform


class ConsensusParams(MethodParams):
    base: Literal["task_arithmetic", "ties"] = Field("task_arithmetic", description="how the shared vector is merged")
    lam_c: float = Field(0.3, ge=0.0, description="mask threshold: keep |τ_t| > lam_c · |τ_merged − τ_t|")
    lam: float = Field(1.0, description="scaling λ of the shared vector")
    keep: float = Field(0.2, gt=0.0, le=1.0, description="TIES base only: fraction kept by trimming")


@register
class Consensus(MergeMethod):
    """TALL masks (Wang et al., 2024) over a Task Arithmetic (sum) or TIES shared vector.

    Stored per group: the shared vector, and per member a 1-bit mask of the entries that matter
    to that task; task t reads θ0 + mask_t ⊙ τ_merged.
    """

    name = "consensus"
    elementwise = True
    summary = "shared TA/TIES vector + per-task TALL masks (|τ_t| > λc·|τ_merged − τ_t|)"
    reference = "https://arxiv.org/abs/2405.07813"
    Params = ConsensusParams
    uses_masks = True

    def transforms(self) -> list[Transform]:
        trim = [TopKTrim(self.p.keep)] if self.p.base == "ties" else []
        return [*super().transforms(), *trim]

    def merge(self, deltas: torch.Tensor) -> GroupResult:
        if self.p.base == "ties":
            merged = self.p.lam * disjoint_mean(deltas, elect_sign(deltas))
        else:
            merged = self.p.lam * deltas.sum(0)
        masks = deltas.abs() > self.p.lam_c * (merged - deltas).abs()
        return GroupResult(merged, masks=masks)
