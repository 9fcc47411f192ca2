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
    mask_source: Literal["trimmed", "finetuned"] = Field(
        "trimmed", description="task vectors the masks compare: 'trimmed' (after TIES trim/DARE, as FlexMerge's "
        "loop) or 'finetuned' (the untrimmed θ_t − θ0, TALL masks' definition and code)")
    keep: float = Field(0.2, gt=0.0, le=1.0, description="TIES base only: fraction kept by trimming")
    trim: Literal["reference", "exact"] = Field("reference", description="TIES base only: trim rule (see ties)")


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
        trim = [TopKTrim(self.p.keep, self.p.trim)] if self.p.base == "ties" else []
        return [*super().transforms(), *trim]

    @property
    def uses_untransformed(self) -> bool:
        return self.p.mask_source == "finetuned" and bool(self.transforms())

    def merge(self, deltas: torch.Tensor) -> GroupResult:
        """(n, d) task vectors; with `uses_untransformed`, (2n, d): transformed, then untransformed."""
        n = deltas.shape[0] // 2 if self.uses_untransformed else deltas.shape[0]
        merged_from, masks_from = deltas[:n], deltas[n:] if self.uses_untransformed else deltas
        if self.p.base == "ties":
            merged = self.p.lam * disjoint_mean(merged_from, elect_sign(merged_from))
        else:
            merged = self.p.lam * merged_from.sum(0)
        masks = masks_from.abs() > self.p.lam_c * (merged - masks_from).abs()  # strict, as TALL's code
        return GroupResult(merged, masks=masks)
