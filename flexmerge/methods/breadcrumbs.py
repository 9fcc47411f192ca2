from __future__ import annotations

from pydantic import Field

from flexmerge.methods import generalized as gta
from flexmerge.methods.base import register


class BreadcrumbsParams(gta.MergekitGTAParams):
    gamma: float = Field(0.01, ge=0.0, le=1.0, description="fraction of each tensor's largest magnitudes dropped "
                         "as outliers (fewer when needed to keep `density`)")


@register
class Breadcrumbs(gta.GTAMethod):
    """Model Breadcrumbs (Davari & Belilovsky, 2023) as mergekit's `breadcrumbs`: each tensor of each
    task vector loses its `gamma` largest and its smallest magnitudes, keeping `density`
    (`preprocess.OutlierTrim`), then weighted task arithmetic (normalize: false, mergekit's default)."""

    name = "breadcrumbs"
    summary = "drop each tensor's largest (outliers) and smallest magnitudes, keep density, then weighted TA"
    reference = "https://arxiv.org/abs/2312.06795"
    Params = BreadcrumbsParams

    @property
    def config(self) -> gta.GTAConfig:
        return gta.GTAConfig(dare=self.p.dare, seed=self.p.seed, consensus=self.consensus,
                             combine="mean" if self.p.normalize else "sum", lam=self.p.lam, sparsifier="outliers",
                             density=self.p.density, gamma=self.p.gamma, rescale=self.p.rescale)


@register
class BreadcrumbsTies(Breadcrumbs):
    """mergekit's `breadcrumbs_ties`: Breadcrumbs' sparsification, then TIES' sign election."""

    name = "breadcrumbs_ties"
    summary = "Breadcrumbs' sparsification, then TIES' sign election and (weighted) agreeing sum"
    consensus = "sum"
