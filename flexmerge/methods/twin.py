from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from flexmerge.blocks import PartView
from flexmerge.methods import generalized as gta
from flexmerge.methods.base import GroupResult, MethodParams, Residual, StructuredMethod, register
from flexmerge.preprocess import Transform

REFERENCE_DENSITY = 0.1  # Twin-Merging's scripts: mask_strategy=svd, mask_rate=0.9 -> density 1 - 0.9


class TwinParams(MethodParams):
    # trim_scope and combine came after artifacts were written with twin: recorded only when set
    recorded_when_set: ClassVar[tuple[str, ...]] = ("trim_scope", "combine")

    base: Literal["task_arithmetic", "ties"] = Field("task_arithmetic", description="how the shared vector is merged")
    lam: float | None = Field(None, description="scaling of the shared vector [default: 0.3 for task_arithmetic "
                              "(Twin-Merging's config), 1.0 for ties]")
    convention: Literal["sum", "mean"] = Field(
        "sum", description="task_arithmetic base: 'sum': λ·Σ τ_i (Twin-Merging's code); 'mean': λ·mean(τ_i)")
    keep: float = gta.keep_field(gta.TIES_BASE)
    trim: gta.TrimRule = gta.trim_field(gta.TIES_BASE)
    trim_scope: gta.TrimScope = gta.trim_scope_field(gta.TIES_BASE)
    combine: gta.Combine = gta.combine_field(gta.TIES_BASE)
    rank: int | None = Field(None, ge=0, description="rank kept per 2-D tensor of each residual (absolute)")
    density: float | None = Field(None, ge=0.0, le=1.0, description="rank = int(density·min(m, n)) per 2-D tensor, "
                                  "Twin-Merging's rule [default 0.1 when neither rank nor energy is given]")
    energy: float | None = Field(None, gt=0.0, le=1.0, description="smallest rank whose singular values hold this "
                                 "fraction of the residual's Σσ² (data-dependent: sizes known once merged)")

    @model_validator(mode="after")
    def _one_rank_rule(self) -> "TwinParams":
        given = [k for k in ("rank", "density", "energy") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of rank, density and energy, not {' and '.join(given)}")
        if not given:
            self.density = REFERENCE_DENSITY
        return self


@register
class Twin(StructuredMethod):
    """Twin-Merging (Lu et al., NeurIPS 2024): a shared merged vector plus, per member, its
    exclusive residual r_t = τ_t − shared compressed by truncated SVD, as the authors' code does.

    Shared: λ·Σ τ_i (task arithmetic, λ = 0.3 as its twin_merge.yml) or TIES. Residual, per 2-D
    tensor: U_r·diag(S_r) and V_rᵀ of the top r singular triplets; every other tensor (1-D, conv
    kernels) is stored exactly, as the reference's `sparsify.svd` returns 1-D tensors unchanged.
    Member t reads θ0 + shared + U_r S_r V_rᵀ. The residuals are taken against the members' task
    vectors before trimming/DARE, θ_t − θ*, as in the reference."""

    name = "twin"
    summary = "shared TA/TIES vector + per-task truncated-SVD residuals τ_t − shared (rank, density or energy)"
    reference = "https://arxiv.org/abs/2406.15479"
    Params = TwinParams
    uses_residuals = True

    @property
    def config(self) -> gta.GTAConfig:
        """The shared vector: λ·Σ τ or λ·mean τ (`convention`), or TIES with this method's options."""
        if self.p.base == "ties":
            return gta.GTAConfig.ties(self.p, self.lam)
        return gta.GTAConfig.task_arithmetic(self.p, self.p.convention, self.lam)

    def transforms(self) -> list[Transform]:
        return self.config.transforms()

    @property
    def uses_untransformed(self) -> bool:
        return bool(self.transforms())

    @property
    def lam(self) -> float:
        return self.p.lam if self.p.lam is not None else (0.3 if self.p.base == "task_arithmetic" else 1.0)

    def residual_rank(self, shape: tuple[int, ...]) -> int | None:
        """Rank stored for a residual tensor of `shape` (None: stored exactly, or data-dependent)."""
        if len(shape) != 2:
            return None
        k = min(shape)
        if self.p.rank is not None:
            return min(self.p.rank, k)
        if self.p.density is not None:
            return int(self.p.density * k)
        return None

    @property
    def data_dependent_size(self) -> bool:
        return self.p.energy is not None

    def shared(self, deltas: torch.Tensor) -> torch.Tensor:
        """The group's shared vector from its (n, D) (transformed) task vectors."""
        return gta.merge(deltas, self.config)

    def merge_flat(self, deltas: torch.Tensor, parts: Sequence[PartView]) -> GroupResult:
        """Planning's merged-vector mode: the group's merged vector is its shared vector (the
        (n, D) rows are the transformed task vectors only; no residuals are needed)."""
        return GroupResult(self.shared(deltas))

    def merge_parts(self, deltas: list[torch.Tensor], parts: Sequence[PartView]) -> GroupResult:
        """deltas[i]: (n, *shape), or (2n, *shape) with the untransformed rows below."""
        rows = deltas[0].shape[0]
        n = rows // 2 if self.uses_untransformed else rows
        shared = [self.shared(d[:n].flatten(1)).view(d.shape[1:]) for d in deltas]
        raw = [d[n:] if self.uses_untransformed else d for d in deltas]
        residuals = [[self.compress(r[i] - s) for r, s in zip(raw, shared)] for i in range(n)]
        return GroupResult(torch.cat([s.flatten() for s in shared]), residuals=residuals)

    def compress(self, residual: torch.Tensor) -> Residual:
        """(U_r·diag(S_r), V_rᵀ) of a 2-D residual; any other tensor as itself."""
        if residual.dim() != 2:
            return (residual.clone(),)
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        r = self.residual_rank(tuple(residual.shape))
        if r is None:
            r = energy_rank(s, self.p.energy)
        return (u[:, :r] * s[:r], vh[:r].contiguous())


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """The smallest r with Σ_{i<r} σ_i² >= energy · Σ σ_i² (0 for a zero residual)."""
    e = s.double().square()
    total = float(e.sum())
    if total == 0.0:
        return 0
    return min(int((e.cumsum(0) < energy * total).sum()) + 1, len(s))


def rebuild(residual: Residual) -> torch.Tensor:
    """The fp32 residual a member's stored factors (or exact tensor) stand for."""
    if len(residual) == 1:
        return residual[0].float()
    a, b = residual
    return a.float() @ b.float()
