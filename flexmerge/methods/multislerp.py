from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from flexmerge.blocks import PartView
from flexmerge.errors import ConfigError
from flexmerge.methods.base import GroupResult, StructuredMethod, WeightedParams, register
from flexmerge.methods.nuslerp import Space, space_field


class MultiSlerpParams(WeightedParams):
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, gt=0.0, description="numerical guard of the norms")
    space: Space = space_field()


def multislerp(tensors: torch.Tensor, weights: torch.Tensor, normalize_weights: bool = True,
               eps: float = 1e-8) -> torch.Tensor:
    """mergekit's `multislerp` of (n, ...) tensors, each taken whole as one vector: their unit vectors'
    weighted mean direction, moved along the weighted mean of their tangents there (the exponential
    map), scaled to their weighted mean norm. A vanishing mean direction falls back to the linear
    merge for two tensors and is an error for more."""
    n, shape = tensors.shape[0], tensors.shape[1:]
    flat = tensors.reshape(n, -1)
    w = weights.to(device=flat.device, dtype=flat.dtype)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    unit = flat / (norms + eps)
    mean = (unit * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if n == 2:
            return (tensors[0] * w[0] + tensors[1] * w[1]).view(shape)
        raise ConfigError("multislerp: the members' weighted mean direction vanishes (antipodal task vectors whose "
                          "weights balance out); give them other weights")
    mean = mean / mean_norm
    tangents = unit - (unit * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * w.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    return (result * (norms.squeeze(-1) * w).sum()).view(shape)


@register
class MultiSlerp(StructuredMethod):
    """mergekit's `multislerp`, per tensor: barycentric interpolation on the hypersphere of the
    members' task vectors (mergekit with a base_model) or weights (`space="weights"`), with their
    weights. Any group: the merge of more than two models that slerp and nuslerp cannot make."""

    name = "multislerp"
    summary = "weighted spherical (tangent-space) mean of the task vectors or models, per tensor"
    reference = "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"
    Params = MultiSlerpParams

    @property
    def needs_base(self) -> bool:
        return self.p.space == "weights"

    @property
    def merges_weights(self) -> bool:
        return self.p.space == "weights"

    def merge_parts(self, deltas: list[torch.Tensor], parts: Sequence[PartView]) -> GroupResult:
        out = []
        for d in deltas:
            taus, base = (d[:-1], d[-1]) if self.needs_base else (d, 0.0)
            w = self.member_weights(taus.shape[0], d.device)
            w = torch.ones(taus.shape[0], device=d.device) if w is None else w
            out.append((multislerp(taus + base, w, self.p.normalize_weights, self.p.eps) - base).flatten())
        return GroupResult(torch.cat(out))
