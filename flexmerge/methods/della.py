from __future__ import annotations

from pydantic import Field, model_validator

from flexmerge.methods import generalized as gta
from flexmerge.methods.base import register


class DellaParams(gta.MergekitGTAParams):
    epsilon: float = Field(0.15, ge=0.0, description="spread of the keep probabilities: density ± epsilon from "
                           "the smallest to the largest magnitude of a row")
    normalize: bool = Field(True, description="divide by the weights of the members agreeing with the elected "
                            "sign (mergekit's normalize; della's default)")
    rescale: bool = Field(True, description="scale what each tensor keeps back to its L1 norm (mergekit's rescale, "
                          "its default for della)")

    @model_validator(mode="after")
    def _probabilities(self) -> "DellaParams":
        if self.density < 1.0 and not (0.0 < self.density - self.epsilon and self.density + self.epsilon < 1.0):
            raise ValueError(f"density ± epsilon must lie in (0, 1), got density {self.density}, "
                             f"epsilon {self.epsilon}")
        return self


@register
class Della(gta.GTAMethod):
    """DELLA-Merging (Deep et al., 2024) as mergekit's `della`: MAGPRUNE keeps each entry with a
    probability rising with its magnitude rank in its row (`preprocess.MagPrune`, seeded draws that
    do not depend on chunking), rescales each tensor to its L1 norm, then TIES' sign election and
    the agreeing members' weighted mean, × λ."""

    name = "della"
    summary = "keep entries with probability rising with their magnitude rank (MAGPRUNE), rescale, elect, merge"
    reference = "https://arxiv.org/abs/2406.11617"
    Params = DellaParams
    consensus = "sum"

    @property
    def config(self) -> gta.GTAConfig:
        return gta.GTAConfig(dare=self.p.dare, seed=self.p.seed, consensus=self.consensus,
                             combine="mean" if self.p.normalize else "sum", lam=self.p.lam, sparsifier="magprune",
                             density=self.p.density, epsilon=self.p.epsilon, rescale=self.p.rescale)


class DellaLinearParams(DellaParams):
    normalize: bool = Field(False, description="divide by Σ w_i (mergekit's normalize; false for della_linear)")


@register
class DellaLinear(Della):
    """mergekit's `della_linear`: DELLA's MAGPRUNE and rescale, then weighted task arithmetic."""

    name = "della_linear"
    summary = "MAGPRUNE and rescale, then weighted task arithmetic (no sign election)"
    Params = DellaLinearParams
    consensus = "none"
