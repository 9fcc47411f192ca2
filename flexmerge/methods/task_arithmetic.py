from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from flexmerge.methods import generalized as gta
from flexmerge.methods.base import GroupResult, MergeMethod, WeightedParams, register
from flexmerge.preprocess import Transform


class TaskArithmeticParams(WeightedParams):
    lam: float = Field(1.5, description="scaling λ (1.5 with 'mean' is FlexMerge's vision setting)")
    convention: Literal["mean", "sum"] = Field(
        "mean", description="'mean': λ·mean(τ_i), as FlexMerge's code; 'sum': λ·Σ τ_i, as Ilharco et al."
    )


@register
class TaskArithmetic(MergeMethod):
    """Task Arithmetic (Ilharco et al., 2023): generalized task arithmetic without trim or sign election."""

    name = "task_arithmetic"
    elementwise = True
    summary = "scaled mean (FlexMerge's convention) or scaled sum (the original paper's) of task vectors"
    reference = "https://arxiv.org/abs/2212.04089"
    Params = TaskArithmeticParams

    @property
    def config(self) -> gta.GTAConfig:
        return gta.GTAConfig.task_arithmetic(self.p, self.p.convention, self.p.lam)

    def transforms(self) -> list[Transform]:
        return self.config.transforms()

    def merge(self, deltas: torch.Tensor) -> GroupResult:
        """w·Σ τ_i (`generalized.merge`), with the members' weights when given; a task alone
        keeps its own vector."""
        if deltas.shape[0] == 1:
            return GroupResult(deltas.sum(0))
        return GroupResult(gta.merge(deltas, self.config, self.member_weights(deltas.shape[0], deltas.device)))

    def member_weight(self, n: int) -> float:
        """Each member's weight in an unweighted group of `n` (a task alone keeps its own vector)."""
        return 1.0 if n == 1 else gta.linear_weight(n, self.p.convention, self.p.lam)

    def linear_weights(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        if self.p.weights is not None and self._members is not None and n > 1:
            return gta.linear_weights(self.member_weights(n, device), self.p.convention, self.p.lam)
        return torch.full((n,), self.member_weight(n), dtype=torch.float64, device=device)
