from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from flexmerge.methods.base import GroupResult, MergeMethod, MethodParams, register
from flexmerge.methods.kernels import clamp_rows, minmax_normalize


class PcbParams(MethodParams):
    ratio: float = Field(0.1, gt=0.0, le=1.0, description="fraction of highest balance scores kept per task")
    lam: float = Field(1.0, description="scaling λ of the merged vector")
    clip: float = Field(1e-4, ge=0.0, lt=0.5, description="magnitude outlier clipping: rank quantiles at both ends")
    inter: Literal["tanh", "softmax"] = Field(
        "tanh", description="inter-balancing: 'tanh' of τ_i ⊙ Σ_j τ_j, as the PCB authors' code (used by "
        "FlexMerge); 'softmax' over the tasks, the paper's formula")


@register
class Pcb(MergeMethod):
    """PCB-Merging (Du et al., 2024): parameter competition balancing.

    intra-balance exp(n · minmax(|τ_i|)²) times inter-balance tanh(τ_i ⊙ Σ_j τ_j) (the authors'
    code; `inter="softmax"`: softmax over the tasks, the paper's formula) gives a
    score per entry; scores below each task's (1 − ratio) rank quantile are dropped, the rest are
    min-max normalized into weights of a weighted average. The quantiles and normalizations are
    taken over the group's block (flexmerge merges per block), not over the whole model.
    """

    name = "pcb"
    summary = "intra/inter parameter-competition scores, drop low scores, weighted average"
    reference = "https://arxiv.org/abs/2410.02396"
    Params = PcbParams

    def merge(self, deltas: torch.Tensor) -> GroupResult:
        n = deltas.shape[0]
        magnitude = clamp_rows(deltas.abs(), self.p.clip, self.p.clip)
        clipped = torch.sign(deltas) * magnitude
        intra = torch.exp(n * minmax_normalize(magnitude, 1) ** 2)
        competition = deltas * deltas.sum(0)
        inter = torch.tanh(competition) if self.p.inter == "tanh" else torch.softmax(competition, dim=0)
        score = clamp_rows(intra * inter, 1.0 - self.p.ratio, 0.0)
        weight = minmax_normalize(score, 1)
        merged = (clipped * weight).sum(0) / weight.sum(0).clamp_min(1e-12)
        return GroupResult(self.p.lam * merged)
