"""The merging-method interface and its registry.

A method sees the task vectors of one group's members on one block, flattened to (n, D) fp32,
and returns what is stored for the group. Global per-task preprocessing (TIES trimming, DARE)
is declared by `transforms()` and applied before planning and merging.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flexmerge.blocks import PartView
from flexmerge.device import to_host
from flexmerge.errors import ConfigError, UnknownNameError
from flexmerge.preprocess import DareDrop, Pipeline, Transform


# One member's residual on one tensor: (A, B) low-rank factors with residual = A @ B, or (R,) exactly.
Residual = tuple[torch.Tensor, ...]


@dataclass
class GroupResult:
    """What one group stores: a merged task vector, for mask methods per-member masks/scales, and
    for residual methods (Twin-Merging) per member, per tensor of the block, its residual."""

    delta: torch.Tensor  # (D,) fp32
    masks: torch.Tensor | None = None  # (n, D) bool
    scales: torch.Tensor | None = None  # (n,) fp32
    residuals: list[list[Residual]] | None = None  # [member][part]

    @staticmethod
    def concat(parts: list["GroupResult"]) -> "GroupResult":
        """Join the results of consecutive chunks of a block (elementwise methods)."""
        masks = torch.cat([p.masks for p in parts], 1) if parts[0].masks is not None else None
        return GroupResult(torch.cat([p.delta for p in parts]), masks, parts[0].scales)

    def to_host(self) -> "GroupResult":
        """This result in host memory (merging may have run on a GPU); on the CPU, itself."""
        host = lambda t: None if t is None else to_host(t)  # noqa: E731
        residuals = None if self.residuals is None else [[tuple(map(to_host, r)) for r in member]
                                                         for member in self.residuals]
        return GroupResult(to_host(self.delta), host(self.masks), host(self.scales), residuals)

    def task_delta(self, i: int) -> torch.Tensor:
        """The task vector that member i of the group reads."""
        if self.masks is None:
            return self.delta
        d = self.delta * self.masks[i]
        return d * self.scales[i] if self.scales is not None else d


# A block streamed to a method: consecutive (part index, (n, d) chunk of that part's flat entries).
BlockChunks = Iterable[tuple[int, torch.Tensor]]


class MethodParams(BaseModel):
    """Options every method takes: DARE as an optional preprocessing of the task vectors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # lam=NaN would write an all-NaN model
    dare: float = Field(0.0, ge=0.0, lt=1.0, description="DARE drop rate p applied first (0 = off)")
    seed: int = Field(0, description="seed of DARE's drops")
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="dtype of what is stored (default: the inputs'); arithmetic is always fp32")


class MergeMethod:
    """Base class: subclasses set `name`, `Params`, and implement `merge`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    reference: ClassVar[str] = ""
    Params: ClassVar[type[MethodParams]] = MethodParams
    uses_masks: ClassVar[bool] = False  # stores θ0 + unified vector + 1-bit mask per member
    uses_scales: ClassVar[bool] = False  # and one fp32 rescaler per member
    elementwise: ClassVar[bool] = False  # merging a slice of entries needs only that slice
    uses_residuals: ClassVar[bool] = False  # stores θ0 + shared and per member a residual per tensor

    def residual_rank(self, shape: tuple[int, ...]) -> int | None:
        """Residual methods: the rank stored for a 2-D tensor of `shape`; None: stored exactly
        (or, with `data_dependent_size`, chosen from the data at merge time)."""
        return None

    @property
    def data_dependent_size(self) -> bool:
        """Whether what a group stores depends on the values (then planned sizes are upper bounds)."""
        return False

    @property
    def uses_untransformed(self) -> bool:
        """Whether materializing must also hand the method the members' task vectors before its
        transforms (TIES trim, DARE): then each chunk is (2n, d), the transformed rows first."""
        return False

    def __init__(self, **params: object):
        try:
            self.p = self.Params(**params)
        except ValidationError as e:
            raise ConfigError(f"invalid parameters for method {self.name!r}: {_short(e)}") from None

    def params(self) -> dict[str, object]:
        return self.p.model_dump()

    def storage_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        return getattr(torch, self.p.dtype) if self.p.dtype else input_dtype

    def transforms(self) -> list[Transform]:
        """Global preprocessing, in order. DARE (when on) always comes first."""
        return [DareDrop(self.p.dare, self.p.seed)] if self.p.dare > 0 else []

    def pipeline(self) -> Pipeline:
        return Pipeline(self.transforms())

    def merge(self, deltas: torch.Tensor) -> GroupResult:
        """Merge the (n, D) task vectors of a group with n >= 2 members (flat view of a block)."""
        raise NotImplementedError

    def merge_parts(self, deltas: list[torch.Tensor], parts: Sequence[PartView]) -> GroupResult:
        """Merge a block given per tensor: deltas[i] is (n, *parts[i].shape). Methods that need
        shapes (SVD-based ones) override this; the default merges the flat concatenation."""
        return self.merge(torch.cat([d.flatten(1) for d in deltas], 1))

    def merge_chunks(self, chunks: BlockChunks, parts: Sequence[PartView]) -> GroupResult:
        """The one entry point for materializing: a block as consecutive (part, (n, d) chunk) pairs.

        Elementwise methods merge chunk by chunk, so memory holds one chunk of the members at a
        time, and the chunks may be one reused buffer; others see the whole block, per tensor."""
        if self.elementwise:
            return _merge_into(self, chunks, sum(p.numel for p in parts))
        pieces: list[list[torch.Tensor]] = [[] for _ in parts]
        for p, c in chunks:
            pieces[p].append(c)  # fresh tensors: only elementwise methods get a reused buffer
        n = next(x for ps in pieces for x in ps).shape[0]
        return self.merge_parts([torch.cat(ps, 1).view(n, *part.shape) for ps, part in zip(pieces, parts)], parts)

    def merge_flat(self, deltas: torch.Tensor, parts: Sequence[PartView]) -> GroupResult:
        """Merge a block held as one (n, D) tensor (planning's merged-vector mode)."""
        pieces = torch.split(deltas, [p.numel for p in parts], dim=1)
        return self.merge_chunks(list(enumerate(pieces)), parts)

    def linear_weights(self, n: int, device: torch.device | None = None) -> torch.Tensor | None:
        """w with merged = Σ w_i τ_i when the method is linear (lets planning use Gram matrices);
        on `device` (None: the host)."""
        return None

    def describe(self) -> dict[str, object]:
        return {"name": self.name, **self.params()}


def _merge_into(method: MergeMethod, chunks: BlockChunks, total: int) -> GroupResult:
    """Merge chunk by chunk into one preallocated result of the block's `total` entries: no list
    of per-chunk results to concatenate (a second block-sized copy), and no result aliases a
    chunk (the caller may reuse its buffer)."""
    out: GroupResult | None = None
    at = 0
    for _, c in chunks:
        r = method.merge(c)
        if out is None:
            masks = None if r.masks is None else torch.empty((r.masks.shape[0], total), dtype=r.masks.dtype,
                                                             device=r.masks.device)
            out = GroupResult(torch.empty(total, dtype=r.delta.dtype, device=r.delta.device), masks, r.scales)
        width = r.delta.numel()
        if at + width > total:
            raise ValueError(f"the chunks hold more than the parts' {total} entries")
        out.delta[at:at + width] = r.delta
        if masks is not None:
            out.masks[:, at:at + width] = r.masks
        at += width
    if out is None or at != total:
        raise ValueError(f"the chunks hold {at} entries, the parts {total}")
    return out


_REGISTRY: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    if cls.name in _REGISTRY:
        raise RuntimeError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def get_method(name: str | MergeMethod, **params: object) -> MergeMethod:
    """A configured method instance by registered name or spec (`ties`, `twin:rank=4:base=ties`;
    the spec's parameters win over `params`); an instance passes through."""
    if isinstance(name, MergeMethod):
        return name
    if ":" in name:
        name, own = parse_method_spec(name)
        params = {**params, **own}
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise UnknownNameError("merging method", name, _REGISTRY) from None
    return cls(**params)


def available_methods() -> dict[str, type[MergeMethod]]:
    return dict(sorted(_REGISTRY.items()))


def parse_method_spec(spec: str) -> tuple[str, dict[str, object]]:
    """'twin:rank=4:base=ties' -> ('twin', {'rank': 4, 'base': 'ties'}): one method and its parameters
    in one word, so a sweep can hold the same method at several settings. Values are read as JSON
    (numbers, true/false, null) or else kept as text."""
    import json

    name, *pairs = [x.strip() for x in spec.split(":")]
    params: dict[str, object] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"method spec {spec!r}: {pair!r} is not key=value (write e.g. twin:rank=4:base=ties)")
        try:
            params[key.strip()] = json.loads(value)
        except ValueError:
            params[key.strip()] = value.strip()
    if not name:
        raise ConfigError(f"method spec {spec!r} names no method")
    return name, params


def _short(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'params'}: {err['msg']}" for err in e.errors())


class StructuredMethod(MergeMethod):
    """A method that merges per tensor and needs each tensor's shape (SVD-based methods): it
    implements `merge_parts`; a flat (n, D) vector without shapes is one 1-D tensor to it."""

    def merge(self, deltas: torch.Tensor) -> GroupResult:
        return self.merge_parts([deltas], [PartView("flat", (deltas.shape[1],))])

    def merge_parts(self, deltas: list[torch.Tensor], parts: Sequence[PartView]) -> GroupResult:
        raise NotImplementedError
