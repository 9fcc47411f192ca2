"""Blocks: the units that are merged. Every mergeable parameter lands in exactly one block.

Discovery reads parameter names only. A *layer* is the name up to its first purely numeric
component (`encoder.layer.3`, `transformer.h.3`, `visual.transformer.resblocks.3`,
`encoder.block.3` for T5's `block.N.layer.K`). Names are matched component by component, never
by bare substring, so `resblocks.1` never captures `resblocks.10`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from flexmerge.errors import ConfigError, UnknownNameError
from flexmerge.io.source import TensorMeta, rows_shape

GRANULARITIES = ("layer", "sublayer", "tensor", "split:K")
_NORM = re.compile(r"(.*norm.*|ln(_?\w*)?|.*_ln)", re.IGNORECASE)
_ATTENTION = re.compile(r".*(attn|attention).*", re.IGNORECASE)


@dataclass(frozen=True)
class PartView:
    """One tensor (or row range of one) of a block, as a merging method sees it: name and shape."""

    key: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Part:
    """A whole tensor (rows=None) or rows [start, stop) of its first dimension."""

    key: str
    rows: tuple[int, int] | None = None

    def numel(self, meta: TensorMeta) -> int:
        if self.rows is None:
            return meta.numel
        return (self.rows[1] - self.rows[0]) * (meta.numel // meta.shape[0])

    def label(self) -> str:
        return self.key if self.rows is None else f"{self.key}[{self.rows[0]}:{self.rows[1]}]"


@dataclass(frozen=True)
class Block:
    name: str
    parts: tuple[Part, ...]

    def views(self, meta: Mapping[str, TensorMeta]) -> list[PartView]:
        """What a merging method sees of this block's tensors: names and (row-sliced) shapes."""
        return [PartView(p.key, rows_shape(meta[p.key].shape, p.rows)) for p in self.parts]


@dataclass(frozen=True)
class Partition:
    """An ordered list of blocks (model order: inputs first), checked to cover each key once."""

    blocks: tuple[Block, ...]
    granularity: str

    def __len__(self) -> int:
        return len(self.blocks)

    def names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def numel(self, meta: Mapping[str, TensorMeta]) -> list[int]:
        return [sum(p.numel(meta[p.key]) for p in b.parts) for b in self.blocks]

    def nbytes(self, meta: Mapping[str, TensorMeta]) -> list[int]:
        return [sum(p.numel(meta[p.key]) * meta[p.key].dtype.itemsize for p in b.parts) for b in self.blocks]


def layer_of(key: str) -> str | None:
    """The numbered-layer prefix of a parameter name, or None for non-layer parameters."""
    comps = key.split(".")
    for i, c in enumerate(comps[:-1]):
        if c.isdigit():
            return ".".join(comps[: i + 1])
    return None


def sublayer_of(key: str) -> str:
    """Attention, MLP, or one norm inside a layer; the parameter's module outside layers."""
    layer = layer_of(key)
    module = key.rsplit(".", 1)[0] if "." in key else key
    if layer is None:
        return module
    inner = key[len(layer) + 1 :].split(".")[:-1]  # module components inside the layer
    for i, c in enumerate(inner):
        if _NORM.fullmatch(c):
            return ".".join([layer, *inner[: i + 1]])
    for i, c in enumerate(inner):
        if _ATTENTION.fullmatch(c):
            return ".".join([layer, *inner[: i + 1]])
    return f"{layer}.mlp"


def discover_blocks(
    keys: list[str],
    meta: Mapping[str, TensorMeta],
    granularity: str = "sublayer",
    patterns: Mapping[str, str] | None = None,
) -> Partition:
    """Partition `keys` into blocks; `patterns` ({name: regex}) override discovery.

    A pattern is matched against the whole parameter name; its capture groups fill `{0}`,
    `{1}`, ... in the block name, so `{"enc.{0}": r"encoder\\.layer\\.(\\d+)\\..*"}` makes one
    block per encoder layer. Keys no pattern matches fall back to `granularity`.
    """
    namer, split_k = _namer(granularity)
    compiled = [(name, _compile(name, rx)) for name, rx in (patterns or {}).items()]
    grouped: dict[str, list[Part]] = {}
    for key in keys:
        hits = [(name, m) for name, rx in compiled if (m := rx.fullmatch(key))]
        if len(hits) > 1:
            raise ConfigError(f"parameter {key!r} matches several block patterns: {[h[0] for h in hits]}")
        if hits:
            name, m = hits[0]
            grouped.setdefault(_block_name(name, m), []).append(Part(key))
        elif split_k and len(meta[key].shape) == 2:
            for part in _row_parts(key, meta[key].shape[0], split_k):
                grouped.setdefault(part.label(), []).append(part)
        else:
            grouped.setdefault(namer(key), []).append(Part(key))
    blocks = tuple(Block(name, tuple(parts)) for name, parts in grouped.items())
    partition = Partition(blocks, granularity)
    check_partition(partition, keys)
    return partition


def _compile(name: object, rx: object) -> re.Pattern:
    if not isinstance(name, str) or not isinstance(rx, str):
        raise ConfigError(f"block pattern {name!r}: {rx!r} must map a name to a regular expression (both text)")
    try:
        return re.compile(rx)
    except re.error as e:
        raise ConfigError(f"block pattern {name!r}: {rx!r} is not a valid regular expression ({e})") from None


def _block_name(name: str, m: re.Match) -> str:
    """The pattern's block name with `{0}`, `{1}`, ... filled from the match's capture groups."""
    try:
        filled = name.format(*m.groups())
    except (IndexError, KeyError, ValueError, AttributeError) as e:
        raise ConfigError(f"block name {name!r}: its placeholders need capture groups that the pattern does not "
                          f"have ({m.re.groups} capture groups; use {{0}}..{{{max(m.re.groups - 1, 0)}}}): {e!r}"
                          ) from None
    if len(filled) > 512:
        raise ConfigError(f"block name {name[:60]!r} gives a name of {len(filled)} characters; 512 at most")
    return filled


def check_partition(partition: Partition, keys: list[str]) -> None:
    """Every key's rows are covered exactly once, and nothing outside `keys` is included."""
    covered: dict[str, list[tuple[int, int] | None]] = {}
    for block in partition.blocks:
        for part in block.parts:
            covered.setdefault(part.key, []).append(part.rows)
    unknown = sorted(set(covered) - set(keys))
    missing = [k for k in keys if k not in covered]
    if unknown or missing:
        raise ConfigError(f"block partition mismatch: unknown keys {unknown[:5]}, uncovered keys {missing[:5]}")
    for key, rows in covered.items():
        if len(rows) > 1 and (None in rows or _overlaps(rows)):
            raise ConfigError(f"parameter {key!r} is in more than one block")


def _overlaps(rows: list[tuple[int, int] | None]) -> bool:
    spans = sorted(r for r in rows if r is not None)
    return any(a[1] > b[0] for a, b in zip(spans, spans[1:]))


def _row_parts(key: str, nrows: int, k: int) -> list[Part]:
    k = min(k, nrows)
    bounds = [round(i * nrows / k) for i in range(k + 1)]
    return [Part(key, (a, b)) for a, b in zip(bounds, bounds[1:])]


def _namer(granularity: str):
    if granularity == "layer":
        return (lambda key: layer_of(key) or (key.rsplit(".", 1)[0] if "." in key else key)), 0
    if granularity == "sublayer":
        return sublayer_of, 0
    if granularity == "tensor":
        return (lambda key: key), 0
    if granularity.startswith("split:"):
        try:
            k = int(granularity.split(":", 1)[1])
        except ValueError:
            k = 0
        if k < 1:
            raise ConfigError(f"granularity {granularity!r}: K in split:K must be a positive integer")
        return (lambda key: key), k
    raise UnknownNameError("granularity", granularity, GRANULARITIES)
