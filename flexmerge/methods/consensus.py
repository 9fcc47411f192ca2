from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from flexmerge.methods import generalized as gta
from flexmerge.methods.base import GroupResult, MergeMethod, MethodParams, register
from flexmerge.preprocess import Transform


class ConsensusParams(MethodParams):
    # trim_scope and combine came after artifacts were written with consensus: recorded only when set
    recorded_when_set: ClassVar[tuple[str, ...]] = ("trim_scope", "combine")

    base: Literal["task_arithmetic", "ties"] = Field("task_arithmetic", description="how the shared vector is merged")
    lam_c: float = Field(0.3, ge=0.0, description="mask threshold: keep |τ_t| > lam_c · |τ_merged − τ_t|")
    lam: float = Field(1.0, description="scaling λ of the shared vector")
    mask_source: Literal["trimmed", "finetuned"] = Field(
        "trimmed", description="task vectors the masks compare: 'trimmed' (after TIES trim/DARE, as FlexMerge's "
        "loop) or 'finetuned' (the untrimmed θ_t − θ0, TALL masks' definition and code)")
    keep: float = gta.keep_field(gta.TIES_BASE)
    trim: gta.TrimRule = gta.trim_field(gta.TIES_BASE)
    trim_scope: gta.TrimScope = gta.trim_scope_field(gta.TIES_BASE)
    combine: gta.Combine = gta.combine_field(gta.TIES_BASE)


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

    @property
    def config(self) -> gta.GTAConfig:
        """The shared vector: λ·Σ τ (TALL's task arithmetic) or TIES with this method's options."""
        if self.p.base == "ties":
            return gta.GTAConfig.ties(self.p, self.p.lam)
        return gta.GTAConfig.task_arithmetic(self.p, "sum", self.p.lam)

    def transforms(self) -> list[Transform]:
        return self.config.transforms()

    @property
    def uses_untransformed(self) -> bool:
        return self.p.mask_source == "finetuned" and bool(self.transforms())

    def merge(self, deltas: torch.Tensor) -> GroupResult:
        """(n, d) task vectors; with `uses_untransformed`, (2n, d): transformed, then untransformed."""
        n = deltas.shape[0] // 2 if self.uses_untransformed else deltas.shape[0]
        merged_from, masks_from = deltas[:n], deltas[n:] if self.uses_untransformed else deltas
        merged = gta.merge(merged_from, self.config)
        masks = masks_from.abs() > self.p.lam_c * (merged - masks_from).abs()  # strict, as TALL's code
        return GroupResult(merged, masks=masks)
