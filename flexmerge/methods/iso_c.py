from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from flexmerge.blocks import PartView
from flexmerge.methods.base import GroupResult, MethodParams, StructuredMethod, register
from flexmerge.methods.kernels import left_sum


class IsoCParams(MethodParams):
    scaling_factor: float = Field(1.0, description="scaling of the merged task vector (FusionBench's default 1.0; "
                                                   "its examples use 1.5)")


@register
class IsoC(StructuredMethod):
    """Iso-C, isotropic merging (Marczak et al., ICML 2025), as FusionBench 0.2.33 computes it.

    Per 2-D tensor: the members' summed task vector (formed as sum / n · n, as the reference does)
    with its spectrum replaced by the mean singular value, U · mean(S)·I · Vᵀ. Every other tensor is
    the members' mean (sum / n). The result is scaled by `scaling_factor`.
    """

    name = "iso_c"
    summary = "per 2-D tensor: summed task vector with a flat spectrum (its mean singular value); others averaged"
    reference = "https://arxiv.org/abs/2502.04959"
    Params = IsoCParams

    def merge_parts(self, deltas: list[torch.Tensor], parts: Sequence[PartView]) -> GroupResult:
        out = [iso_c_tensor(d) if d.dim() == 3 else left_sum(d) / d.shape[0] for d in deltas]
        return GroupResult(self.p.scaling_factor * torch.cat([x.flatten() for x in out]))


def iso_c_tensor(deltas: torch.Tensor) -> torch.Tensor:
    n = deltas.shape[0]
    summed = left_sum(deltas) / n
    summed *= n
    u, s, vh = torch.linalg.svd(summed, full_matrices=False)
    return torch.linalg.multi_dot((u, torch.diag(torch.ones_like(s) * s.mean()), vh))
