from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from flexmerge.blocks import PartView
from flexmerge.methods.base import GroupResult, MethodParams, StructuredMethod, register
from flexmerge.methods.kernels import left_sum, polar, running_mean


class IsoCtsParams(MethodParams):
    scaling_factor: float = Field(1.0, description="scaling of the merged task vector (FusionBench's default 1.0)")
    common_space_fraction: float = Field(0.8, gt=0.0, le=1.0,
                                         description="fraction of the k singular directions kept common")


@register
class IsoCts(StructuredMethod):
    """Iso-CTS, isotropic merging with common and task-specific subspaces (Marczak et al., ICML 2025),
    as FusionBench 0.2.33 computes it.

    Per 2-D tensor (k = min of the dims): the top c directions of the summed task vector are
    common, with c = k − round((k − int(k·f)) / n)·n (Python's round: halves to even); each member
    adds its top p = (k − c) / n directions of its task vector projected off the common column
    space, τ_i − U_c U_cᵀ τ_i. The side-by-side U's and Vᵀ's [task 0 | ... | task n−1 | common] are
    replaced by their polar factors and the spectrum by its mean. Other tensors: running mean.
    The result is scaled by `scaling_factor`.
    """

    name = "iso_cts"
    summary = "per 2-D tensor: common + task-specific singular subspaces, orthogonalized, flat spectrum"
    reference = "https://arxiv.org/abs/2502.04959"
    Params = IsoCtsParams

    def merge_parts(self, deltas: list[torch.Tensor], parts: Sequence[PartView]) -> GroupResult:
        f = self.p.common_space_fraction
        out = [iso_cts_tensor(d, f) if d.dim() == 3 else running_mean(d) for d in deltas]
        return GroupResult(self.p.scaling_factor * torch.cat([x.flatten() for x in out]))


def common_and_task_dims(k: int, n: int, fraction: float) -> tuple[int, int]:
    """(c, p): the common subspace's size and each member's, as FusionBench rounds them."""
    task_total = round((k - int(k * fraction)) / n) * n
    c = k - task_total
    return c, int((k - c) / n)


def iso_cts_tensor(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    n, m, cols = deltas.shape
    k = min(m, cols)
    c, p = common_and_task_dims(k, n, fraction)
    u, s, vh = torch.linalg.svd(left_sum(deltas), full_matrices=False)
    u_c, s_c, v_c = u[:, :c], s[:c], vh[:c, :]
    like = {"dtype": deltas.dtype, "device": deltas.device}
    comb_u = torch.zeros(m, k, **like)
    comb_s = torch.zeros(k, **like)
    comb_v = torch.zeros(k, cols, **like)
    for i in range(n):
        w = deltas[i]
        u_t, s_t, vh_t = torch.linalg.svd(w - u_c @ u_c.T @ w, full_matrices=False)
        comb_u[:, i * p:(i + 1) * p] = u_t[:, :p]
        comb_s[i * p:(i + 1) * p] = s_t[:p]
        comb_v[i * p:(i + 1) * p, :] = vh_t[:p, :]
    comb_u[:, n * p:n * p + c] = u_c
    comb_s[n * p:n * p + c] = s_c
    comb_v[n * p:n * p + c, :] = v_c
    flat = torch.ones_like(comb_s) * comb_s.mean()
    return torch.linalg.multi_dot((polar(comb_u), torch.diag(flat), polar(comb_v)))
