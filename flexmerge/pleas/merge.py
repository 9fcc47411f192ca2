"""PLeaS (Nasery et al., CVPR 2025): merge two models of one architecture, even from different bases.

1. match each permutation group's units by activation correlation on calibration inputs (Hungarian);
2. per group, merge the best-matching pairs and keep the rest of both models' units side by side,
   with widths chosen to meet a size S in [1, 2] (flexmerge.pleas.schedule);
3. refit every linear layer by masked least squares so its outputs match the two models' permuted
   features (merged units: their mean), from the two models' own permuted inputs (closed form,
   streamed: flexmerge.pleas.lstsq).
Without step 3 ("permutation only") merged weights are means and cross blocks are copied, as in the
reference's `build_partial_merge_model`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from flexmerge.errors import CheckpointError, ConfigError
from flexmerge.pleas import modeling
from flexmerge.pleas.common import (PleasModel, State, allowed_inputs, check_matching, check_pair, check_two, layout,
                                    recording, widen_matrix)
from flexmerge.pleas.lstsq import DEFAULT_RIDGE, NormalEquations
from flexmerge.pleas.matching import (CorrelationStats, Split, chunk_hungarian, chunk_quality, pair_quality, split,
                                       weight_matching)
from flexmerge.pleas.schedule import dense_size, schedule, size_of
from flexmerge.pleas.spec import Linear, PermSpec, spec_for


class WidePleasModel(PleasModel):
    """A merged residual MLP or GroupNorm CNN: the torch-only classes of flexmerge.pleas.modeling."""

    def build(self) -> torch.nn.Module:
        return modeling.build(self.config)

    def write(self, directory: Path) -> None:
        """model.safetensors, heads/<task>.safetensors, config.json and modeling_pleas.py (a copy of
        flexmerge.pleas.modeling, so that the output loads with torch alone)."""
        save_file({k: v.contiguous() for k, v in self.state.items()}, str(directory / modeling.WEIGHTS))
        (directory / "heads").mkdir()
        for task, head in self.heads.items():
            save_file({k: v.contiguous() for k, v in head.items()}, str(directory / "heads" / f"{task}.safetensors"))
        (directory / modeling.CONFIG).write_text(json.dumps(self.config, indent=1))
        shutil.copyfile(modeling.__file__, directory / "modeling_pleas.py")


# ---- models and features ---------------------------------------------------------------------------

def model_config(spec: PermSpec, widths: Mapping[str, tuple[int, int]]) -> dict:
    """The widened model class's config: the spec's fixed entries plus each group's [merged, private]."""
    def of(g: str | list[str]):
        return [of(x) for x in g] if isinstance(g, list) else list(widths[g])

    return {**spec.config, **{entry: of(g) for entry, g in spec.widths.items()}}


def original_model(spec: PermSpec, state: State) -> torch.nn.Module:
    """An input model as the widened class with no private units (the same function exactly)."""
    model = modeling.build(model_config(spec, {g: (n, 0) for g, n in spec.sizes.items()}))
    model.load_state_dict(state)
    return model.eval()


def _batches(x: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    yield from x.split(batch_size)


def _layout_units(ta: torch.Tensor, tb: torch.Tensor, s: Split) -> torch.Tensor:
    """`layout` of activations along their unit axis (axis 1: features or channels; a flattened axis of
    units x positions, as a linear layer reading pooled conv features sees it, is laid out per unit)."""
    n = len(s.a_order)
    if ta.dim() == 2 and ta.shape[1] != n:
        return layout(ta.unflatten(1, (n, -1)), tb.unflatten(1, (n, -1)), 1, s).flatten(1)
    return layout(ta, tb, 1, s)


def unit_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """Activations as (samples x positions, n units): channels of (N, C, H, W) maps, or an (N, n x k)
    flattened axis read as n units at k positions each."""
    if t.dim() > 2:
        t = t.movedim(1, -1)
    elif t.shape[1] != n:
        t = t.unflatten(1, (n, -1)).movedim(1, -1)
    return t.reshape(-1, n)


# ---- 1. matching ------------------------------------------------------------------------------------

@torch.no_grad()
def correlations(spec: PermSpec, a: torch.nn.Module, b: torch.nn.Module, calibration: torch.Tensor,
                 batch_size: int) -> dict[str, torch.Tensor]:
    """Per group, the (n, n) correlation of a's units with b's over every tap and calibration input."""
    stats = {g: CorrelationStats(n) for g, n in spec.sizes.items()}
    names = {name for taps in spec.taps.values() for name, _ in taps}
    with recording(a, names) as fa, recording(b, names) as fb:
        for x in _batches(calibration, batch_size):
            a(x), b(x)
            for g, taps in spec.taps.items():
                for name, side in taps:
                    k, n = (0 if side == "in" else 1), spec.sizes[g]
                    stats[g].add(unit_rows(fa[name][k], n), unit_rows(fb[name][k], n))
    return {g: s.correlation() for g, s in stats.items()}


def match(spec: PermSpec, sa: State, sb: State, corr: Mapping[str, torch.Tensor] | None, matching: str
          ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per group: perm[i] = b's unit matched to a's unit i, and each pair's quality (what the greedy
    schedule ranks by): activation correlation where there is data, else the cosine of their weights."""
    if matching == "weights" or corr is None:  # identity without data: 0 rounds keep the identity
        return weight_matching(spec.groups, spec.axes_of, spec.viewed(sa), spec.viewed(sb),
                               rounds=100 if matching == "weights" else 0, chunks=spec.chunks)
    perms = {g: chunk_hungarian(c, spec.chunk(g)) if matching == "activation" else torch.arange(c.shape[0])
             for g, c in corr.items()}
    return perms, {g: pair_quality(corr[g], p) for g, p in perms.items()}


def splits_for(spec: PermSpec, shapes: Mapping[str, tuple[int, ...]], perms: Mapping[str, torch.Tensor],
               quality: Mapping[str, torch.Tensor], size: float, schedule_name: str) -> dict[str, Split]:
    """Pick widths for `size` from the pairs' quality and lay every group out [merged | a | b]."""
    ranked = {g: chunk_quality(q, spec.chunk(g)) for g, q in quality.items()}
    private = schedule(schedule_name, spec, shapes, size, ranked)
    return {g: split(perms[g], quality[g], spec.sizes[g] - private[g], spec.chunk(g)) for g in spec.sizes}


# ---- 2. the widened model (permutation only) ---------------------------------------------------------

def widen(spec: PermSpec, sa: State, sb: State, splits: Mapping[str, Split]) -> State:
    """Both models' weights in the [merged | a | b] layout of every group (the reference's blocks)."""
    out = {}
    for key in spec.keys():
        axes, ta, tb = spec.axes_of(key), spec.view(key, sa[key]), spec.view(key, sb[key])
        if len(axes) == 1:
            (dim, g), = axes.items()
            out[key] = spec.stored(key, layout(ta, tb, dim, splits[g]))
        else:
            out[key] = spec.stored(key, widen_matrix(ta, tb, splits[axes[0]], splits[axes[1]]))
    return out


def layer_rows(lin: Linear, x: torch.Tensor) -> torch.Tensor:
    """A layer's inputs as the rows its weight multiplies: unfolded patches for a conv, else as they are."""
    if lin.conv is None:
        return x.reshape(-1, x.shape[-1])
    kernel, stride, padding = lin.conv
    patches = torch.nn.functional.unfold(x, kernel, padding=padding, stride=stride)  # (N, C*k*k, positions)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


# ---- 3. least-squares refit --------------------------------------------------------------------------

@torch.no_grad()
def refit(spec: PermSpec, a: torch.nn.Module, b: torch.nn.Module, calibration: torch.Tensor,
          splits: Mapping[str, Split], state: State, batch_size: int, ridge: float) -> list[str]:
    """Replace each linear layer that has merged units by its masked least-squares fit; returns their names.

    A layer with no merged inputs or outputs keeps its permuted weights: they already are the exact
    solution (each private output is its own model's function of its own model's inputs)."""
    todo = [lin for lin in spec.linears
            if splits[lin.out].merged > 0 or (lin.inp is not None and splits[lin.inp].merged > 0)]
    if not todo:
        return []
    n_in = {lin.name: state[f"{lin.name}.weight"][0].numel() for lin in todo}
    eqs = {lin.name: NormalEquations(n_in[lin.name], splits[lin.out].width) for lin in todo}
    with recording(a, set(eqs)) as fa, recording(b, set(eqs)) as fb:
        for x in _batches(calibration, batch_size):
            a(x), b(x)
            for lin in todo:
                (xa, ya), (xb, yb) = fa[lin.name], fb[lin.name]
                xin = xa if lin.inp is None else _layout_units(xa, xb, splits[lin.inp])
                so = splits[lin.out]
                eqs[lin.name].add(layer_rows(lin, xin), unit_rows(_layout_units(ya, yb, so), so.width))
    for lin in todo:
        mask = allowed_inputs(splits[lin.out], None if lin.inp is None else splits[lin.inp], n_in[lin.name])
        w, bias = eqs[lin.name].solve(mask, ridge)
        weight = state[f"{lin.name}.weight"]
        state[f"{lin.name}.weight"], state[f"{lin.name}.bias"] = w.reshape(weight.shape).to(weight.dtype), \
            bias.to(weight.dtype)
    return [lin.name for lin in todo]


# ---- heads --------------------------------------------------------------------------------------------

def widen_head(head: State, s: Split, which: str) -> State:
    """A task's head reading its own slice of the features (zeros on the other model's private units)."""
    w = head["weight"]
    if w.shape[1] != len(s.a_order):
        raise CheckpointError(f"a head reads {w.shape[1]} features but the encoder has {len(s.a_order)}")
    order = s.a_order if which == "a" else s.b_order
    wo = w[:, order]
    out = torch.zeros(w.shape[0], s.width, dtype=w.dtype)
    out[:, :s.merged] = wo[:, :s.merged]
    start = s.merged if which == "a" else s.merged + s.private
    out[:, start:start + s.private] = wo[:, s.merged:]
    return {"weight": out, "bias": head["bias"].clone()}


# ---- the whole method -----------------------------------------------------------------------------------

def check_calibration(x: torch.Tensor, input_shape: tuple[int, ...]) -> torch.Tensor:
    """The inputs as float32, if they are a non-empty batch of `input_shape` (-1: any size) and finite."""
    fits = isinstance(x, torch.Tensor) and x.dim() == len(input_shape) + 1 and x.shape[0] > 0 and all(
        want in (-1, got) for want, got in zip(input_shape, x.shape[1:]))
    if not fits:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        want = ", ".join("·" if d == -1 else str(d) for d in input_shape)
        raise ConfigError(f"calibration inputs must be a non-empty (N, {want}) tensor; got {shape}")
    if not x.is_floating_point() or not torch.isfinite(x).all():
        raise ConfigError("calibration inputs must be finite floating-point values")
    return x.float()


def pleas_merge(states: Mapping[str, State], calibration: torch.Tensor | None, size: float, *,
                heads: Mapping[str, State] | None = None, schedule_name: str = "greedy",
                matching: str = "activation", least_squares: bool = True, ridge: float = DEFAULT_RIDGE,
                batch_size: int = 256, architecture: str | None = None) -> PleasModel:
    """Two models (name -> state dict) merged by PLeaS to `size` in [1, 2].

    calibration None: no data, so matching must be 'weights' (or 'identity') and least_squares False."""
    check_two(states)
    (na, sa), (nb, sb) = states.items()
    check_pair(sa, sb, (na, nb))
    spec = spec_for(sa, architecture)
    check_matching(matching, calibration is not None, least_squares)
    x = None if calibration is None else check_calibration(calibration, spec.input_shape)
    unknown = sorted(set(heads or {}) - {na, nb})
    if unknown:
        raise ConfigError(f"heads given for {', '.join(unknown)}, which are not the merged models ({na}, {nb})")
    ma, mb = original_model(spec, sa), original_model(spec, sb)
    shapes = {k: tuple(v.shape) for k, v in spec.viewed(sa).items()}
    corr = None if x is None or matching == "weights" else correlations(spec, ma, mb, x, batch_size)
    splits = splits_for(spec, shapes, *match(spec, sa, sb, corr, matching), size, schedule_name)
    state = widen(spec, sa, sb, splits)
    refitted = refit(spec, ma, mb, x, splits, state, batch_size, ridge) if least_squares else []
    private = {g: s.private for g, s in splits.items()}
    feats = splits[spec.features]
    config = {
        **model_config(spec, {g: (s.merged, s.private) for g, s in splits.items()}),
        "widths": "units merged + 2x private: " + ", ".join(f"{g} {s.merged}+2x{s.private}" for g, s in splits.items()),
        "tasks": [na, nb], "feature_slices": {na: "merged + first private block", nb: "merged + second private block"},
        "size": size_of(spec, shapes, private), "dense_size": dense_size(spec, shapes, private),
        "requested_size": size, "schedule": schedule_name, "matching": matching,
        "least_squares": least_squares, "ridge": ridge, "refitted": refitted, "calibration_samples": 0 if x is None else x.shape[0],
        "permutations": {g: {na: s.a_order.tolist(), nb: s.b_order.tolist()} for g, s in splits.items()},
    }
    wide_heads = {t: widen_head(h, feats, "a" if t == na else "b") for t, h in (heads or {}).items()}
    return WidePleasModel(config, state, wide_heads)
