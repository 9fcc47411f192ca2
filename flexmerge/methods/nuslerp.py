from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field

from flexmerge.blocks import PartView
from flexmerge.methods.base import GroupResult, StructuredMethod, WeightedParams, register

Space = Literal["deltas", "weights"]


def space_field() -> Any:
    return Field("deltas", description="'deltas': interpolate the task vectors (mergekit with a base_model); "
                 "'weights': the models' weights (mergekit without one)")


class NuSlerpParams(WeightedParams):
    nuslerp_row_wise: bool = Field(False, description="interpolate the columns (vectors along dim 0) separately")
    nuslerp_flatten: bool = Field(True, description="interpolate each tensor as one vector (else each row)")
    space: Space = space_field()


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, eps: float = 1e-8,
            flatten: bool = False) -> torch.Tensor:
    """mergekit's `nuslerp`: slerp of the vectors along `dim` (or of the tensors flattened), linear
    where they are collinear."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    unit = lambda x: x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)  # noqa: E731
    cos = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(collinear, 0, cos))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(collinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(shape)


@register
class NuSlerp(StructuredMethod):
    """mergekit's `nuslerp`, per tensor: the slerp of two members at t = w_2 / (w_1 + w_2) (their
    weights; 0.5 when these cancel), of their task vectors (mergekit with a base_model) or of their
    weights (`space="weights"`). Two tasks only (multislerp or karcher merge more)."""

    name = "nuslerp"
    summary = "slerp of two task vectors (or models) at t = w2/(w1+w2), per tensor or row (two tasks only)"
    reference = "https://github.com/arcee-ai/mergekit"
    Params = NuSlerpParams
    pairwise = True

    @property
    def needs_base(self) -> bool:
        return self.p.space == "weights"

    @property
    def merges_weights(self) -> bool:
        return self.p.space == "weights"

    def merge_parts(self, deltas: list[torch.Tensor], parts: Sequence[PartView]) -> GroupResult:
        w = self.member_weights(2)
        w = [1.0, 1.0] if w is None else w.tolist()
        t = 0.5 if abs(sum(w)) < 1e-6 else w[1] / sum(w)
        dim = 0 if self.p.nuslerp_row_wise else -1
        out = []
        for d in deltas:
            base = d[2] if self.needs_base else 0.0
            merged = nuslerp(t, base + d[0], base + d[1], dim=dim, flatten=self.p.nuslerp_flatten)
            out.append((merged - base).flatten())
        return GroupResult(torch.cat(out))
