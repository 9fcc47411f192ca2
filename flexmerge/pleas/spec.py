"""Permutation specs: which weight axes share one permutation, and which layers PLeaS refits.

A spec is data. `groups` maps a permutation group (a set of hidden units) to the (tensor, axis)
pairs it permutes; `linears` lists each linear layer with the group its inputs and outputs live
in (None: the model's raw input, never permuted); `taps` names where a group's features are read
for matching (the inputs of the layers that read the group, and the final features).
Shipped: the residual MLP (`residual-mlp`, the digits suite's `DigitsNet` and any depth/width of it);
BERT-style HF encoders have their spec in flexmerge.pleas.bert (`BERT`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from flexmerge.errors import ConfigError


@dataclass(frozen=True)
class Linear:
    name: str            # module path, e.g. "layers.0.mlp.0"; tensors NAME.weight (out, in) and NAME.bias
    inp: str | None      # permutation group of the inputs (None: raw input)
    out: str             # permutation group of the outputs


@dataclass
class PermSpec:
    architecture: str
    in_features: int
    groups: dict[str, list[tuple[str, int]]]          # group -> [(tensor key, axis)]
    sizes: dict[str, int]                              # group -> number of units
    linears: list[Linear]
    taps: dict[str, list[tuple[str, str]]]             # group -> [(module, "in" | "out")]
    config: dict = field(default_factory=dict)         # what the model class needs besides the widths

    def keys(self) -> set[str]:
        return {key for axes in self.groups.values() for key, _ in axes}

    def axes_of(self, key: str) -> dict[int, str]:
        """axis -> group, for one tensor."""
        return {axis: g for g, axes in self.groups.items() for k, axis in axes if k == key}


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
        raise ConfigError(unsupported_message(state, missing or ["layers.0.mlp.0.weight"]))
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
    return PermSpec("residual-mlp", state["embed.weight"].shape[1], groups, sizes, linears, taps)


SPECS = {"residual-mlp": residual_mlp_spec}


def unsupported_message(state: dict[str, torch.Tensor], missing: list[str]) -> str:
    shown = ", ".join(sorted(state)[:6]) + (", ..." if len(state) > 6 else "")
    return (f"no PLeaS permutation spec fits this model: the residual-mlp spec needs {', '.join(missing[:6])}, "
            f"which it lacks (its parameters: {shown}); supported architectures: {', '.join(SPECS)}, and BERT-style "
            "Hugging Face encoders given as model directories")


def spec_for(state: dict[str, torch.Tensor], architecture: str | None = None) -> PermSpec:
    """The spec of the named architecture, or of the one the parameter names match."""
    if architecture is not None and architecture not in SPECS:
        from flexmerge.errors import UnknownNameError

        raise UnknownNameError("PLeaS architecture", architecture, SPECS)
    return SPECS[architecture or "residual-mlp"](state)
