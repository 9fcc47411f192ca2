"""Generalized task arithmetic: Task Arithmetic, TIES, DARE and their relatives as one composition.

As mergekit's `generalized_task_arithmetic.py` composes them, a merge of a group's (n, ...) task
vectors is: sparsify each (DARE's random drop with rescale, then a magnitude top-k trim; either,
both or neither), elect a sign per entry (none, by the sum of the values, or by the count of their
signs), combine the members (a mean or a sum, over the agreeing members when a sign was elected),
scale by λ. `task_arithmetic`, `dare`, `ties`, `consensus` and `twin` each name one `GTAConfig`, so
their shared vectors are written once, here, from the kernels of `kernels.py`.

Sparsification is global in flexmerge: the trim's threshold is taken over the whole task vector
(`trim_scope="model"`) and DARE's drops must not depend on chunking, so a method declares them as
preprocessing (`GTAConfig.transforms`, fitted and streamed by `flexmerge.preprocess`) and merges
the sparsified chunks with `merge`. `sparsify` is the same sparsification on task vectors held
whole (one tensor, or a model flattened), as a definition to check the streamed one against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, get_args

import torch
from pydantic import Field

from flexmerge.errors import ConfigError
from flexmerge.methods.base import GroupResult, MergeMethod, WeightedParams
from flexmerge.methods.kernels import agrees, disjoint_mean, disjoint_sum, elect_sign
from flexmerge.preprocess import DareDrop, L1Rescale, MagPrune, OutlierTrim, TopKTrim, Transform, trim_rank

Consensus = Literal["none", "sum", "count"]
Sparsifier = Literal["none", "outliers", "magprune"]
Combine = Literal["mean", "sum"]
TrimRule = Literal["reference", "exact", "floor"]
TrimScope = Literal["model", "tensor"]


@dataclass(frozen=True)
class GTAConfig:
    """One generalized task arithmetic: `dare` (drop rate, 0 = off; `seed` its draws), `keep`
    (fraction kept by the magnitude trim, 1 = off; `trim` its rank rule, `trim_scope` what the
    top-k is taken over), `consensus` (sign election), `combine` and `lam` (λ)."""

    dare: float = 0.0
    seed: int = 0
    keep: float = 1.0
    trim: TrimRule = "reference"
    trim_scope: TrimScope = "model"
    consensus: Consensus = "none"
    combine: Combine = "mean"
    lam: float = 1.0
    # mergekit's other sparsifications, of each tensor at `density` (1 = off): Model Breadcrumbs'
    # band without the `gamma` outliers, DELLA's MAGPRUNE (`epsilon`, drawn with `seed`); `rescale`:
    # the survivors of each tensor scaled to its L1 norm (mergekit's `rescale`)
    sparsifier: Sparsifier = "none"
    density: float = 1.0
    gamma: float = 0.0
    epsilon: float = 0.0
    rescale: bool = False

    def __post_init__(self) -> None:
        for name, kind in (("trim", TrimRule), ("trim_scope", TrimScope), ("consensus", Consensus),
                           ("combine", Combine), ("sparsifier", Sparsifier)):
            if getattr(self, name) not in get_args(kind):
                raise ConfigError(f"{name} must be one of {', '.join(map(repr, get_args(kind)))}, "
                                  f"got {getattr(self, name)!r}")

    @classmethod
    def task_arithmetic(cls, p: Sparsifying, combine: Combine, lam: float) -> GTAConfig:
        """λ·mean τ or λ·Σ τ, after `p`'s DARE (if on)."""
        return cls(dare=p.dare, seed=p.seed, combine=combine, lam=lam)

    @classmethod
    def ties(cls, p: TiesOptions, lam: float) -> GTAConfig:
        """TIES with `p`'s options: DARE (if on), trim, sign elected by the sum, combine, λ."""
        return cls(dare=p.dare, seed=p.seed, keep=p.keep, trim=p.trim, trim_scope=p.trim_scope,
                   consensus="sum", combine=p.combine, lam=lam)

    def transforms(self) -> list[Transform]:
        """The sparsification as global preprocessing, in order: DARE, the trim, then Breadcrumbs'
        or DELLA's. keep=1 and density=1 keep every entry (as mergekit's), so need no pass."""
        dare = [DareDrop(self.dare, self.seed)] if self.dare > 0 else []
        trim = [TopKTrim(self.keep, self.trim, self.trim_scope)] if self.keep < 1.0 else []
        return [*dare, *trim, *self._sparsification()]

    def _sparsification(self) -> list[Transform]:
        if self.sparsifier == "none" or self.density >= 1.0:
            return []
        step = (OutlierTrim(self.density, self.gamma) if self.sparsifier == "outliers"
                else MagPrune(self.density, self.epsilon, self.seed))
        return [L1Rescale(step) if self.rescale else step]


class Sparsifying(Protocol):
    """Method parameters with DARE (every method's)."""

    dare: float
    seed: int


class TiesOptions(Sparsifying, Protocol):
    """Method parameters with TIES' options (`ties`, and `consensus`/`twin` for their TIES base)."""

    keep: float
    trim: TrimRule
    trim_scope: TrimScope
    combine: Combine


def magnitude_trim(deltas: torch.Tensor, keep: float, rule: TrimRule = "reference") -> torch.Tensor:
    """Each row of (n, ...) `deltas` cut to its largest magnitudes: |τ| >= the row's r-th largest
    |τ| is kept (r = `preprocess.trim_rank`), the rest zeroed; what `TopKTrim` finds in two
    streamed passes over a whole model, here over what `deltas` holds."""
    flat = deltas.flatten(1)
    threshold = flat.abs().topk(trim_rank(flat.shape[1], keep, rule), dim=1).values[:, -1:]
    return torch.where(flat.abs() >= threshold, flat, flat.new_zeros(())).view_as(deltas)


def dare_drop(deltas: torch.Tensor, p: float, uniform: torch.Tensor) -> torch.Tensor:
    """DARE: an entry whose uniform draw is below `p` is dropped, the others are rescaled by
    1/(1 − p) so each entry keeps its expectation (`DareDrop`, drawing from a counter hash)."""
    return torch.where(uniform >= p, deltas / (1.0 - p), deltas.new_zeros(()))


def sparsify(deltas: torch.Tensor, cfg: GTAConfig, uniform: torch.Tensor | None = None) -> torch.Tensor:
    """`cfg`'s sparsification of task vectors held whole, in the preprocessing's order: DARE with
    draws `uniform` (default: torch's generator seeded with `cfg.seed`), then the trim over each
    row (the scope is what `deltas` holds: one tensor, or a model flattened)."""
    out = deltas
    if cfg.dare > 0:
        if uniform is None:
            uniform = torch.rand(deltas.shape, generator=torch.Generator().manual_seed(cfg.seed))
        out = dare_drop(out, cfg.dare, uniform.to(deltas.device))
    return magnitude_trim(out, cfg.keep, cfg.trim) if cfg.keep < 1.0 else out


def elect(deltas: torch.Tensor, consensus: Consensus) -> torch.Tensor | None:
    """Per entry, the elected sign (±1; a tie elects +): of the summed values ("sum", TIES), of
    the summed signs ("count", a majority of the members); None for "none"."""
    if consensus == "none":
        return None
    return elect_sign(deltas if consensus == "sum" else torch.sign(deltas))


def linear_weight(n: int, combine: Combine, lam: float) -> float:
    """Each member's weight in a merge of `n` without sign election: λ/n ("mean") or λ ("sum")."""
    return lam / n if combine == "mean" else lam


def linear_weights(weights: torch.Tensor, combine: Combine, lam: float) -> torch.Tensor:
    """The coefficients of a weighted merge without sign election: λ·w / Σ w ("mean", with
    `weighted_merge`'s guard on a vanishing Σ w) or λ·w ("sum")."""
    if combine == "sum":
        return lam * weights
    total = float(weights.sum())
    return lam * weights / (1.0 if abs(total) < 1e-8 else total)


def merge(deltas: torch.Tensor, cfg: GTAConfig, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The (D,) merge of a group's (n, D) sparsified task vectors under `cfg`, with the members'
    (n,) `weights` when given (`weighted_merge`).

    Without a sign election it is w·Σ τ_i (w = `linear_weight`): a sum over the group reads the
    task vectors at memory speed, where the same product as a (1, n) @ (n, D) GEMV ran at half
    of it (MKL, 8 rows of 256K entries). With one, the agreeing members' disjoint mean or sum, ×λ."""
    if weights is not None:
        return weighted_merge(deltas, cfg, weights)
    sign = elect(deltas, cfg.consensus)
    if sign is None:
        return _scaled(deltas.sum(0), linear_weight(deltas.shape[0], cfg.combine, cfg.lam))
    return _scaled((disjoint_mean if cfg.combine == "mean" else disjoint_sum)(deltas, sign), cfg.lam)


def weighted_merge(deltas: torch.Tensor, cfg: GTAConfig, weights: torch.Tensor) -> torch.Tensor:
    """mergekit's merge with per-model weights w (`generalized_task_arithmetic.py`, in its order of
    operations): the signs are elected on the weighted vectors w_i·τ_i, whose (agreeing) sum is
    divided, for "mean" (mergekit's `normalize`), by Σ w_i over the members that enter each entry
    (a divisor of 0 is taken as 1; without an election, one below 1e-8), then scaled by λ."""
    w = weights.to(device=deltas.device, dtype=deltas.dtype).view(-1, *[1] * (deltas.dim() - 1))
    weighted = deltas * w
    sign = elect(weighted, cfg.consensus)
    if sign is None:
        mixed = weighted.sum(0)
        divisor = w.sum(0)
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    else:
        mask = agrees(weighted, sign)
        mixed = weighted.mul_(mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    if cfg.combine == "mean":
        mixed = mixed.div_(divisor)
    return _scaled(mixed, cfg.lam)


def _scaled(merged: torch.Tensor, w: float) -> torch.Tensor:
    """`merged` (a fresh tensor) × w in place; w = 1 is skipped (x·1 is x, bit for bit)."""
    return merged if w == 1.0 else merged.mul_(w)


# The TIES options' fields, defined once for every method that takes them (each Params class
# lists them in its own order, which is the order its manifests record them in).
TIES_BASE = "ties base only: "  # the note of consensus' and twin's, whose shared vector may be TIES

def keep_field(note: str = "") -> Any:
    return Field(0.2, gt=0.0, le=1.0, description=f"{note}fraction of largest-magnitude entries kept per task by "
                 "the trim (1 = no trim)")


def trim_field(note: str = "") -> Any:
    return Field("reference", description=f"{note}'reference': keep |τ| >= the (D − int(keep·D))-th smallest, as "
                 "the TIES code (int(keep·D)+1 entries, more on ties); 'exact': round(keep·D) entries, the paper's "
                 "top-k%; 'floor': int(keep·D) entries, as mergekit")


def trim_scope_field(note: str = "") -> Any:
    return Field("model", description=f"{note}'model': the top entries of the whole task vector (TIES paper, "
                 "FlexMerge); 'tensor': of each tensor on its own (mergekit)")


def combine_field(note: str = "") -> Any:
    return Field("mean", description=f"{note}'mean': disjoint mean of the entries agreeing with the elected sign "
                 "(TIES; mergekit's normalize: true); 'sum': their sum (mergekit's normalize: false, the default of "
                 "its dare_ties)")


class MergekitGTAParams(WeightedParams):
    """The options of mergekit's generalized task arithmetic as its newer methods take them."""

    density: float = Field(1.0, ge=0.0, le=1.0, description="fraction of each tensor's entries kept (1 = no "
                           "sparsification, mergekit's default)")
    lam: float = Field(1.0, description="scaling λ of the merged vector (mergekit's lambda)")
    normalize: bool = Field(False, description="divide by the weights of the members entering each entry "
                            "(mergekit's normalize)")
    rescale: bool = Field(False, description="scale what each tensor keeps back to its L1 norm (mergekit's rescale)")


class GTAMethod(MergeMethod):
    """A method that is one `GTAConfig` (`config`): its sparsification as preprocessing, then the
    merge of each chunk with the members' weights; linear when it elects no sign."""

    elementwise = True
    consensus: ClassVar[Consensus] = "none"

    @property
    def config(self) -> GTAConfig:
        raise NotImplementedError

    def transforms(self) -> list[Transform]:
        return self.config.transforms()

    def merge(self, deltas: torch.Tensor) -> GroupResult:
        return GroupResult(merge(deltas, self.config, self.member_weights(deltas.shape[0], deltas.device)))

    def linear_weights(self, n: int, device: torch.device | None = None) -> torch.Tensor | None:
        cfg = self.config
        if cfg.consensus != "none":
            return None
        if getattr(self.p, "weights", None) is not None and self._members is not None:
            return linear_weights(self.member_weights(n, device), cfg.combine, cfg.lam)
        return torch.full((n,), linear_weight(n, cfg.combine, cfg.lam), dtype=torch.float64, device=device)
