from __future__ import annotations

import torch
from pydantic import Field

from flexmerge.methods.base import GroupResult, MergeMethod, MethodParams, register


class NearSwapParams(MethodParams):
    t: float = Field(description="distance scale: entries closer than t take the second model's value")


@register
class NearSwap(MergeMethod):
    """mergekit's `nearswap`: the first task's model (mergekit's base_model), whose entries move to
    the second's in proportion w = clamp(t / |θ_1 − θ_2|, 0, 1): fully where the two are within t.
    Two tasks only."""

    name = "nearswap"
    elementwise = True
    summary = "the first model, taking the second's value where they are within t (two tasks only)"
    reference = "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"
    Params = NearSwapParams
    pairwise = True

    @property
    def merges_weights(self) -> bool:
        return True

    def merge(self, deltas: torch.Tensor) -> GroupResult:
        a, b = deltas[0], deltas[1]  # θ_i − θ0: their difference is the models'
        w = (self.p.t / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
        return GroupResult(w * b + (1 - w) * a)
