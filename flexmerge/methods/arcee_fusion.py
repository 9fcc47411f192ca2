from __future__ import annotations


import torch
import torch.nn.functional as F

from flexmerge.methods.base import MethodParams, WeightSpaceMethod, register


def importance(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """mergekit's `_compute_importance`: |b − a| times, per row, KL(softmax(b) ‖ softmax(a))."""
    p = F.softmax(b, dim=-1) + 1e-8
    q = F.softmax(a, dim=-1) + 1e-8
    return (b - a).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def fusion_threshold(scores: torch.Tensor) -> torch.Tensor:
    """median + 1.5·(q3 − q1) of the scores, each quantile the sorted value at index ⌊q·(N − 1)⌋
    (mergekit's `DynamicThresholdFusion`, which samples a million entries of larger tensors; these
    quantiles are exact)."""
    ordered = torch.sort(scores.reshape(-1)).values
    q1, median, q3 = ordered[(torch.tensor([0.25, 0.5, 0.75], device=ordered.device) * (ordered.numel() - 1)).long()]
    return median + 1.5 * (q3 - q1)


@register
class ArceeFusion(WeightSpaceMethod):
    """mergekit's `arcee_fusion`, per tensor: the first task's model (mergekit's base_model) takes the
    second's values where they matter most: importance |θ_2 − θ_1|·KL(softmax θ_2 ‖ softmax θ_1) per
    row, above median + 1.5·IQR. Two tasks only."""

    name = "arcee_fusion"
    summary = "the first model with the second's most important changes (|Δ|·KL above median + 1.5 IQR)"
    reference = "https://arcee.ai"
    Params = MethodParams
    pairwise = True

    def merge_models(self, models: torch.Tensor) -> torch.Tensor:
        a, b = models[0], models[1]
        scores = importance(b, a)
        mask = (scores >= fusion_threshold(scores)).to(models.dtype)
        return a + (b - a) * mask
