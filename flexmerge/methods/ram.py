from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from flexmerge.blocks import PartView
from flexmerge.methods.base import GroupResult, MergeMethod, MethodParams, StructuredMethod, register


class RamParams(MethodParams):
    epsilon: float = Field(1e-5, ge=0.0, description="|τ| above which an entry counts as changed by a member")


class RamPlusParams(RamParams):
    r: float = Field(0.1, description="strength of the boost of each member's unique entries")
    alpha: float = Field(0.2, ge=0.0, description="cap of the shared/unique ratio that sets the boost")


def contributions(taus: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """mergekit's `_prepare_ram_vectors` on (n, D): which entries each member changes (|τ| > ε), how
    many members change each entry, and the entries changed by several (overlap) and by one (unique)."""
    changed = taus.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    return changed, counts, counts > 1, counts == 1


@register
class Ram(MergeMethod):
    """RAM, Reinforced Agent Merging (mergekit's `ram`): an entry changed (|τ| > ε) by one member keeps
    that member's value, one changed by several takes their mean; unchanged entries stay θ0."""

    name = "ram"
    elementwise = True
    summary = "entries changed by one member keep its value, by several their mean (|τ| > ε counts)"
    reference = "https://arxiv.org/abs/2601.13572"
    Params = RamParams

    def merge(self, deltas: torch.Tensor) -> GroupResult:
        changed, counts, overlap, unique = contributions(deltas, self.p.epsilon)
        z = deltas * changed
        return GroupResult(((z * unique) + (z * overlap / counts.clamp(min=1))).sum(dim=0))


@register
class RamPlusTL(StructuredMethod):
    """RAM+ tensor-local (mergekit's `ramplus_tl`), per tensor: as RAM, with each member's unique
    entries scaled by 1 + r·min(ρ, α), ρ its count of shared over unique changed entries."""

    name = "ramplus_tl"
    summary = "RAM with each member's unique entries boosted by 1 + r·min(shared/unique, α) per tensor"
    reference = "https://arxiv.org/abs/2601.13572"
    Params = RamPlusParams

    def merge_parts(self, deltas: list[torch.Tensor], parts: Sequence[PartView]) -> GroupResult:
        return GroupResult(torch.cat([self.merge_tensor(d.flatten(1)) for d in deltas]))

    def merge_tensor(self, taus: torch.Tensor) -> torch.Tensor:
        """The merge of one tensor's (n, D) task vectors (mergekit's `ramplus_tl_merge`)."""
        changed, counts, overlap, unique = contributions(taus, self.p.epsilon)
        z = taus * changed
        shared = (changed & overlap).sum(dim=1)
        own = (changed & unique).sum(dim=1)
        rho = shared / own.clamp(min=self.p.epsilon)
        boost = 1 + self.p.r * rho.clamp(min=0, max=self.p.alpha)
        return ((z * unique * boost.unsqueeze(-1)) + (z * overlap / counts.clamp(min=1))).sum(dim=0)
