from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from flexmerge.methods.base import WeightSpaceMethod, WeightedParams, register


class KarcherParams(WeightedParams):
    max_iter: int = Field(10, ge=0, description="iterations of the Riemannian gradient descent")
    tol: float = Field(1e-5, gt=0.0, description="stopping tolerance (and the norm below which a tensor is ignored)")


def karcher_mean(tensors: Sequence[torch.Tensor], alphas: Sequence[float], max_iter: int = 10,
                 tol: float = 1e-5) -> torch.Tensor:
    """mergekit's `karcher_merge_tensors`: the weighted Karcher (Fréchet) mean of the tensors'
    directions on the unit sphere, by gradient steps along the mean tangent, scaled by Σ α_i·‖x_i‖.
    Tensors of norm at most `tol` take no part in the direction."""
    norms = [torch.linalg.vector_norm(x) for x in tensors]
    units = [torch.zeros_like(x) if float(nm) == 0.0 else x / nm for x, nm in zip(tensors, norms)]
    valid = [i for i, nm in enumerate(norms) if float(nm) > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    points = [units[i] for i in valid]
    mean = torch.zeros_like(points[0])
    for a, u in zip(weights, points):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean)
    mean = points[0].clone() if float(mean_norm) < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(weights, points):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if float(tangent_norm) < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if float(unit_norm) > tol:
            mean = mean / unit_norm
    return sum(a * nm for a, nm in zip(alphas, norms)) * mean


@register
class Karcher(WeightSpaceMethod):
    """mergekit's `karcher`, per tensor: the Karcher mean of the members' weights (the models
    themselves, as mergekit merges all its inputs), each of weight w_i / Σ w (mergekit: equal; the
    weights are flexmerge's). Any group: a merge of more than two models."""

    name = "karcher"
    summary = "Karcher (Riemannian) mean of the models' weights on the sphere, rescaled; per tensor"
    reference = "https://arxiv.org/abs/2603.04972"
    Params = KarcherParams

    def merge_models(self, models: torch.Tensor) -> torch.Tensor:
        n = models.shape[0]
        w = self.member_weights(n)
        alphas = [1.0 / n] * n if w is None else (w / w.sum()).tolist()
        return karcher_mean(list(models), alphas, self.p.max_iter, self.p.tol)
