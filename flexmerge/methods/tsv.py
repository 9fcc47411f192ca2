from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from flexmerge.blocks import PartView
from flexmerge.methods.base import GroupResult, MethodParams, StructuredMethod, register
from flexmerge.methods.kernels import running_mean


class TsvParams(MethodParams):
    alpha: float = Field(1.0, description="scaling of the merged task vector (FusionBench's default 1)")


@register
class Tsv(StructuredMethod):
    """TSV-M, Task Singular Vectors merging (Gargiulo et al., CVPR 2025), as FusionBench 0.2.33 computes it.

    Per 2-D tensor of the block, each of the n members keeps its top r = ⌊k/n⌋ singular triplets
    (k = min of the dims); the kept U's and Vᵀ's are laid side by side (the k − n·r trailing
    slots stay zero), each replaced by its orthogonal polar factor, and the tensor is rebuilt
    with the kept singular values: τ = U_u·Vh_u · diag(s) · U_v·Vh_v. Every other tensor (1-D,
    conv kernels) is the members' running mean. The result is scaled by `alpha`.
    """

    name = "tsv"
    summary = "per 2-D tensor: top ⌊k/n⌋ singular vectors per task, orthogonalized, rebuilt; others averaged"
    reference = "https://arxiv.org/abs/2412.00081"
    Params = TsvParams

    def merge_parts(self, deltas: list[torch.Tensor], parts: Sequence[PartView]) -> GroupResult:
        out = [tsv_tensor(d) if d.dim() == 3 else running_mean(d) for d in deltas]
        return GroupResult(self.p.alpha * torch.cat([x.flatten() for x in out]))


def tsv_tensor(deltas: torch.Tensor) -> torch.Tensor:
    """TSV-M of one 2-D tensor from its members' (n, m, N) task vectors."""
    n, m, cols = deltas.shape
    k = min(m, cols)
    r = int(k * (1.0 / n))
    like = {"dtype": deltas.dtype, "device": deltas.device}
    sum_u = torch.zeros(m, k, **like)
    sum_s = torch.zeros(k, **like)
    sum_vh = torch.zeros(k, cols, **like)
    for i in range(n):
        u, s, vh = torch.linalg.svd(deltas[i], full_matrices=False)
        sum_u[:, i * r:(i + 1) * r] = u[:, :r]
        sum_s[i * r:(i + 1) * r] = s[:r]
        sum_vh[i * r:(i + 1) * r, :] = vh[:r, :]
    u_u, _, vh_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_vh, _, vh_vh = torch.linalg.svd(sum_vh, full_matrices=False)
    return torch.linalg.multi_dot((u_u, vh_u, torch.diag(sum_s), u_vh, vh_vh))
