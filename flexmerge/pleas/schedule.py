"""Per-group widths that meet a size budget S in [1, 2].

Size = parameters of the merged model that are not zero by construction / parameters of one input
model (heads excluded). A weight whose two axes are both widened has a [merged | a | b] block layout
in which a's private outputs never read b's private inputs (and back): those two blocks are
structural zeros, so the size counts (n_out + p_out)(n_in + p_in) - 2 p_out p_in entries, which is
2x at p = n (both models side by side) and 1x at p = 0 (one merged model). This is the reference's
FLOP count; the dense checkpoint stores the zero blocks too (see `dense_size`).

Schedules (p_g = number of units of group g that stay private in each model):
- `uniform`: the same private fraction r in every group, the largest r whose size is <= S.
- `greedy`: all units of all groups ranked by matching cost (1 - correlation with their partner);
  the worst-matched units are un-merged first, as long as the size stays <= S.
A group whose units move in chunks (GroupNorm groups: `PermSpec.chunks`) is widened a whole chunk
at a time: `uniform` rounds its private count to whole chunks, and `greedy` ranks its chunks by
their mean quality.
"""

from __future__ import annotations

from collections.abc import Mapping

from flexmerge.errors import ConfigError
from flexmerge.pleas.spec import PermSpec

SCHEDULES = ("uniform", "greedy")


def _entries(shape: tuple[int, ...], axes: dict[int, str], sizes: Mapping[str, int],
             private: Mapping[str, int], structural_zeros: bool) -> int:
    dims = list(shape)
    for axis, g in axes.items():
        dims[axis] = sizes[g] + private[g]
    total = 1
    for d in dims:
        total *= d
    if structural_zeros and len(axes) == 2:
        rest = total // (dims[0] * dims[1])
        total -= 2 * private[axes[0]] * private[axes[1]] * rest
    return total


def size_of(spec: PermSpec, shapes: Mapping[str, tuple[int, ...]], private: Mapping[str, int],
            structural_zeros: bool = True) -> float:
    """Merged-model parameters / one model's parameters, for the given private counts."""
    zero = {g: 0 for g in spec.sizes}
    wide = base = 0
    for key, shape in shapes.items():
        axes = spec.axes_of(key)
        wide += _entries(shape, axes, spec.sizes, private, structural_zeros)
        base += _entries(shape, axes, spec.sizes, zero, structural_zeros)
    return wide / base


def dense_size(spec: PermSpec, shapes: Mapping[str, tuple[int, ...]], private: Mapping[str, int]) -> float:
    """What the dense checkpoint stores (structural zeros included), relative to one model."""
    return size_of(spec, shapes, private, structural_zeros=False)


def check_size(size: float) -> None:
    if not 1.0 <= size <= 2.0:
        raise ConfigError(f"PLeaS size must be in [1, 2] (1: one merged model, 2: both side by side); got {size}")


def uniform(spec: PermSpec, shapes: Mapping[str, tuple[int, ...]], size: float) -> dict[str, int]:
    """The largest common private fraction whose size is <= `size` (bisection on the fraction)."""
    check_size(size)

    def at(r: float) -> dict[str, int]:
        return {g: round(r * n / spec.chunk(g)) * spec.chunk(g) for g, n in spec.sizes.items()}

    lo, hi = 0.0, 1.0
    if size_of(spec, shapes, at(hi)) <= size + 1e-12:
        return at(hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if size_of(spec, shapes, at(mid)) <= size + 1e-12 else (lo, mid)
    return at(lo)


def greedy(spec: PermSpec, shapes: Mapping[str, tuple[int, ...]], size: float,
           quality: Mapping[str, list[float]]) -> dict[str, int]:
    """Un-merge the worst-matched units first (across groups) while the size stays <= `size`.

    quality[g] lists group g's pair correlations sorted best first (for a chunked group: its chunks'),
    so a group's private units are always its worst-matched ones; a group whose next unit (chunk)
    does not fit is closed."""
    check_size(size)
    private = {g: 0 for g in spec.sizes}
    ranked = sorted(((q, g, i) for g, qs in quality.items() for i, q in enumerate(qs)), key=lambda t: t[0])
    closed: set[str] = set()
    for _, g, _ in ranked:
        if g in closed:
            continue
        private[g] += spec.chunk(g)
        if size_of(spec, shapes, private) > size + 1e-12:
            private[g] -= spec.chunk(g)
            closed.add(g)
    return private


def schedule(name: str, spec: PermSpec, shapes: Mapping[str, tuple[int, ...]], size: float,
             quality: Mapping[str, list[float]]) -> dict[str, int]:
    if name == "uniform":
        return uniform(spec, shapes, size)
    if name == "greedy":
        return greedy(spec, shapes, size, quality)
    raise ConfigError(f"unknown PLeaS schedule {name!r}; choose one of: {', '.join(SCHEDULES)}")
