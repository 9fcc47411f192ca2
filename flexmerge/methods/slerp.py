from __future__ import annotations

import math

import torch
from pydantic import Field

from flexmerge.methods.base import MethodParams, WeightSpaceMethod, register


class SlerpParams(MethodParams):
    t: float = Field(description="interpolation factor: 0 gives the first task's model, 1 the second's")


def slerp(t: float, a: torch.Tensor, b: torch.Tensor, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    """mergekit's `slerp` of two tensors, each taken whole as one vector: along the great circle
    between their directions, coefficients sin((1 − t)θ)/sin θ and sin(tθ)/sin θ; nearly
    (anti)parallel ones (|cos θ| > `dot_threshold`) are interpolated linearly."""
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = float(((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1))
    if abs(dot) > dot_threshold:
        return (1 - t) * a + t * b
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) / math.sin(theta)) * a + (math.sin(t * theta) / math.sin(theta)) * b


@register
class Slerp(WeightSpaceMethod):
    """mergekit's `slerp`, per tensor: the spherical interpolation of two models' weights, from the
    group's first task (t = 0; mergekit's base_model) to its second (t = 1). It merges exactly two
    models, so it exists for two tasks only (multislerp or karcher merge more)."""

    name = "slerp"
    summary = "spherical interpolation of two models' weights, per tensor (two tasks only)"
    reference = "https://en.wikipedia.org/wiki/Slerp"
    Params = SlerpParams
    pairwise = True

    def merge_models(self, models: torch.Tensor) -> torch.Tensor:
        return slerp(self.p.t, models[0], models[1])
