"""Permutation specs: which weight axes share one permutation, and which layers PLeaS refits.

A spec is data. `groups` maps a permutation group (a set of hidden units) to the (tensor, axis)
pairs it permutes; `linears` lists each linear (or convolution) layer with the group its inputs
and outputs live in (None: the model's raw input, never permuted); `taps` names where a group's
features are read for matching (the inputs of the layers that read the group, and the final
features). `chunks` says how many consecutive units must move together (a GroupNorm group);
`blocks` says which tensor axis holds each unit as a run of entries (a linear layer reading
flattened conv features); `widths` says which config entries of the widened model class
(flexmerge.pleas.modeling) take which groups' [merged, private] widths.
Shipped: the residual MLP (`residual-mlp`, the digits suite's `DigitsNet` and any depth/width of it)
and the pre-norm GroupNorm CNN (`fashion-cnn`, the fashion suite's `FashionNet`); BERT-style HF
encoders have their spec in flexmerge.pleas.bert (`BERT`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from flexmerge.errors import ConfigError, UnknownNameError


@dataclass(frozen=True)
class Linear:
    name: str            # module path, e.g. "layers.0.mlp.0"; tensors NAME.weight (out, in[, kh, kw]) and NAME.bias
    inp: str | None      # permutation group of the inputs (None: raw input)
    out: str             # permutation group of the outputs
    conv: tuple[int, int, int] | None = None   # a Conv2d's (kernel, stride, padding); None: a Linear


@dataclass
class PermSpec:
    architecture: str
    groups: dict[str, list[tuple[str, int]]]          # group -> [(tensor key, axis)]
    sizes: dict[str, int]                              # group -> number of units
    linears: list[Linear]
    taps: dict[str, list[tuple[str, str]]]             # group -> [(module, "in" | "out")]
    config: dict = field(default_factory=dict)         # what the model class needs besides the widths
    widths: dict[str, str | list[str]] = field(default_factory=dict)  # config entry -> group(s) widths
    features: str = "stream"                           # the group the task heads read
    input_shape: tuple[int, ...] = ()                  # one input's shape; -1: any size (image sides)
    chunks: dict[str, int] = field(default_factory=dict)              # group -> units that move together
    blocks: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> (axis, entries per unit)

    def keys(self) -> set[str]:
        return {key for axes in self.groups.values() for key, _ in axes}

    def axes_of(self, key: str) -> dict[int, str]:
        """axis -> group, for one tensor (axes of its unit view, see `view`)."""
        return {axis: g for g, axes in self.groups.items() for k, axis in axes if k == key}

    def chunk(self, group: str) -> int:
        return self.chunks.get(group, 1)

    def view(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """The tensor with one index per unit on every permuted axis (a flattened (units x k) axis unflattened)."""
        if key not in self.blocks:
            return t
        axis, k = self.blocks[key]
        return t.unflatten(axis, (-1, k))

    def stored(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """The inverse of `view`: the tensor as the checkpoint stores it."""
        if key not in self.blocks:
            return t
        axis, _ = self.blocks[key]
        return t.flatten(axis, axis + 1)

    def viewed(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: self.view(k, v) for k, v in state.items()}


_LAYER = re.compile(r"layers\.(\d+)\.mlp\.0\.weight")
_NEEDED = ("embed.weight", "embed.bias", "final_norm.weight", "final_norm.bias")


def residual_mlp_spec(state: dict[str, torch.Tensor]) -> PermSpec:
    """The spec of embed -> L x [h + mlp(norm(h))] -> final_norm (flexmerge.pleas.modeling)."""
    missing = [k for k in _NEEDED if k not in state]
    depth = 1 + max((int(m.group(1)) for k in state if (m := _LAYER.fullmatch(k))), default=-1)
    per_layer = [f"layers.{i}.{t}" for i in range(depth) for t in
                 ("norm.weight", "norm.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias")]
    missing += [k for k in per_layer if k not in state]
    if missing or depth == 0:
        raise ConfigError(unsupported_message(state, {"residual-mlp": missing or ["layers.0.mlp.0.weight"]}))
    extra = sorted(set(state) - set(_NEEDED) - set(per_layer))
    if extra:
        raise ConfigError(f"residual-mlp spec: parameters it does not know how to permute: {', '.join(extra[:8])}; "
                          "pass task heads separately (heads=..., --head NAME=PATH)")
    stream = [("embed.weight", 0), ("embed.bias", 0), ("final_norm.weight", 0), ("final_norm.bias", 0)]
    groups: dict[str, list[tuple[str, int]]] = {"stream": stream}
    linears, taps = [Linear("embed", None, "stream")], {"stream": [("final_norm", "out")]}
    for i in range(depth):
        p, h = f"layers.{i}", f"hidden.{i}"
        stream += [(f"{p}.norm.weight", 0), (f"{p}.norm.bias", 0), (f"{p}.mlp.0.weight", 1),
                   (f"{p}.mlp.2.weight", 0), (f"{p}.mlp.2.bias", 0)]
        groups[h] = [(f"{p}.mlp.0.weight", 0), (f"{p}.mlp.0.bias", 0), (f"{p}.mlp.2.weight", 1)]
        linears += [Linear(f"{p}.mlp.0", "stream", h), Linear(f"{p}.mlp.2", h, "stream")]
        taps["stream"].append((f"{p}.mlp.0", "in"))
        taps[h] = [(f"{p}.mlp.2", "in")]
    sizes = {"stream": state["embed.weight"].shape[0],
             **{f"hidden.{i}": state[f"layers.{i}.mlp.0.weight"].shape[0] for i in range(depth)}}
    n_in = state["embed.weight"].shape[1]
    return PermSpec("residual-mlp", groups, sizes, linears, taps,
                    config={"architecture": "pleas-residual-mlp", "in_features": n_in},
                    widths={"stream": "stream", "hidden": [f"hidden.{i}" for i in range(depth)]},
                    input_shape=(n_in,))


# ---- the fashion suite's CNN ----------------------------------------------------------------------
# FashionNet (flexmerge.suites.fashion, a modeling.WideConvNet): stem Conv2d(k 4, stride 2, pad 1) ->
# layers.i = GroupNorm(4) -> GELU -> Conv2d 3x3 (residual when the width is kept; a layer that changes the
# width has stride 2) -> GELU -> adaptive 3x3 average pool -> flatten -> proj (Linear) -> final_norm (LayerNorm).
# Not in the state dict, so fixed here: the stem's geometry, the norm's group count, the pool side.
CNN_STEM, CNN_NORM_GROUPS, CNN_POOL = (4, 2, 1), 4, 3
_CNN_LAYER = re.compile(r"layers\.(\d+)\.conv\.weight")
_CNN_NEEDED = ("stem.weight", "stem.bias", "proj.weight", "proj.bias", "final_norm.weight", "final_norm.bias")


def fashion_cnn_spec(state: dict[str, torch.Tensor]) -> PermSpec:
    """The spec of FashionNet and any depth/width of its pattern.

    Groups: `stage.s` = the channels of the s-th residual stage (a new stage starts at the stem and
    at every layer that changes the width), permuted in whole GroupNorm groups (`chunks`: GroupNorm
    normalizes each group of consecutive channels over its own members, so a permutation that keeps
    groups whole, and a widened stream made of whole groups, keeps every group's statistics);
    `features` = proj rows and the final LayerNorm (heads read it). proj reads the last stage's
    pooled channels, each a run of pool x pool inputs (`blocks`)."""
    missing = [k for k in _CNN_NEEDED if k not in state]
    depth = 1 + max((int(m.group(1)) for k in state if (m := _CNN_LAYER.fullmatch(k))), default=-1)
    per_layer = [f"layers.{i}.{t}" for i in range(depth) for t in ("norm.weight", "norm.bias", "conv.weight", "conv.bias")]
    missing += [k for k in per_layer if k not in state]
    if missing or depth == 0:
        raise ConfigError(unsupported_message(state, {"fashion-cnn": missing or ["layers.0.conv.weight"]}))
    extra = sorted(set(state) - set(_CNN_NEEDED) - set(per_layer))
    if extra:
        raise ConfigError(f"fashion-cnn spec: parameters it does not know how to permute: {', '.join(extra[:8])}; "
                          "pass task heads separately (heads=..., --head NAME=PATH)")
    widths = [state["stem.weight"].shape[0]] + [state[f"layers.{i}.conv.weight"].shape[0] for i in range(depth)]
    for c in set(widths):
        if c % CNN_NORM_GROUPS:
            raise ConfigError(f"fashion-cnn spec: {c} channels do not split into {CNN_NORM_GROUPS} GroupNorm groups")
    check_cnn_shapes(state, widths)
    stage_of, stages = [0], [widths[0]]          # stage_of[i + 1]: the stage of layer i's output
    for i in range(depth):
        if widths[i + 1] != widths[i]:
            stages.append(widths[i + 1])
        stage_of.append(len(stages) - 1)
    groups: dict[str, list[tuple[str, int]]] = {f"stage.{s}": [] for s in range(len(stages))}
    groups["features"] = [("proj.weight", 0), ("proj.bias", 0), ("final_norm.weight", 0), ("final_norm.bias", 0)]
    groups["stage.0"] += [("stem.weight", 0), ("stem.bias", 0)]
    linears = [Linear("stem", None, "stage.0", CNN_STEM)]
    taps: dict[str, list[tuple[str, str]]] = {g: [] for g in groups}
    for i in range(depth):
        src, dst = f"stage.{stage_of[i]}", f"stage.{stage_of[i + 1]}"
        groups[src] += [(f"layers.{i}.norm.weight", 0), (f"layers.{i}.norm.bias", 0), (f"layers.{i}.conv.weight", 1)]
        groups[dst] += [(f"layers.{i}.conv.weight", 0), (f"layers.{i}.conv.bias", 0)]
        linears.append(Linear(f"layers.{i}.conv", src, dst, (3, 2 if src != dst else 1, 1)))
        taps[src].append((f"layers.{i}.conv", "in"))
    last = f"stage.{len(stages) - 1}"
    groups[last].append(("proj.weight", 1))
    linears.append(Linear("proj", last, "features"))
    taps[last].append(("proj", "in"))
    taps["features"].append(("final_norm", "out"))
    sizes = {**{f"stage.{s}": c for s, c in enumerate(stages)}, "features": state["proj.weight"].shape[0]}
    if state["proj.weight"].shape[1] != stages[-1] * CNN_POOL ** 2:
        raise ConfigError(f"fashion-cnn spec: proj reads {state['proj.weight'].shape[1]} inputs, not the last stage's "
                          f"{stages[-1]} channels x {CNN_POOL}x{CNN_POOL} pooled positions")
    in_channels = state["stem.weight"].shape[1]
    config = {"architecture": "pleas-fashion-cnn", "in_channels": in_channels, "stem": list(CNN_STEM),
              "pool": CNN_POOL, "layer_stages": stage_of[1:],
              "group_sizes": [c // CNN_NORM_GROUPS for c in stages]}
    return PermSpec("fashion-cnn", groups, sizes, linears, taps, config=config,
                    widths={"stages": [f"stage.{s}" for s in range(len(stages))], "features": "features"},
                    features="features", input_shape=(in_channels, -1, -1),
                    chunks={f"stage.{s}": c // CNN_NORM_GROUPS for s, c in enumerate(stages)},
                    blocks={"proj.weight": (1, CNN_POOL ** 2)})


def check_cnn_shapes(state: dict[str, torch.Tensor], widths: list[int]) -> None:
    """Every tensor of the shape the pattern implies (what it fixes rather than reads: kernels, chaining)."""
    k = CNN_STEM[0]
    want = {"stem.weight": (widths[0], state["stem.weight"].shape[1], k, k), "stem.bias": (widths[0],),
            "proj.bias": (state["proj.weight"].shape[0],), "final_norm.weight": (state["proj.weight"].shape[0],),
            "final_norm.bias": (state["proj.weight"].shape[0],)}
    for i, (c_in, c_out) in enumerate(zip(widths, widths[1:])):
        want |= {f"layers.{i}.norm.weight": (c_in,), f"layers.{i}.norm.bias": (c_in,),
                 f"layers.{i}.conv.weight": (c_out, c_in, 3, 3), f"layers.{i}.conv.bias": (c_out,)}
    for key, shape in want.items():
        if tuple(state[key].shape) != shape:
            raise ConfigError(f"fashion-cnn spec: {key} is {tuple(state[key].shape)}, the pattern needs {shape} "
                              f"(stem {k}x{k} conv, 3x3 convs, each layer reading the previous one's channels)")


# The first key tells the architectures apart when none is named.
SPECS: dict[str, Callable[[dict[str, torch.Tensor]], PermSpec]] = {"residual-mlp": residual_mlp_spec,
                                                                   "fashion-cnn": fashion_cnn_spec}
_MARKERS = {"residual-mlp": "embed.weight", "fashion-cnn": "stem.weight"}


def unsupported_message(state: dict[str, torch.Tensor], missing: dict[str, list[str]]) -> str:
    shown = ", ".join(sorted(state)[:6]) + (", ..." if len(state) > 6 else "")
    needs = "; ".join(f"the {arch} spec needs {', '.join(keys[:6])}" for arch, keys in missing.items())
    return (f"no PLeaS permutation spec fits this model: {needs}, which it lacks (its parameters: {shown}); "
            f"supported architectures: {', '.join(SPECS)}, and BERT-style Hugging Face encoders given as model "
            "directories")


def spec_for(state: dict[str, torch.Tensor], architecture: str | None = None) -> PermSpec:
    """The spec of the named architecture, or of the one the parameter names match."""
    if architecture is not None and architecture not in SPECS:
        raise UnknownNameError("PLeaS architecture", architecture, SPECS)
    if architecture is None:
        architecture = next((a for a, key in _MARKERS.items() if key in state), None)
    if architecture is None:
        raise ConfigError(unsupported_message(state, {a: [key] for a, key in _MARKERS.items()}))
    return SPECS[architecture](state)
