"""The widened model classes of a PLeaS checkpoint (torch only): a residual MLP and a GroupNorm CNN.

This file imports nothing from flexmerge; `flexmerge pleas` copies it next to the weights, so
the output loads with torch alone: `import modeling_pleas; model, heads = modeling_pleas.load(DIR)`.

Every permuted axis is laid out as [merged (m) | model a's private (p) | model b's private (p)].
`ViewLayerNorm` normalizes the residual stream as each model sees it (a: merged + a's private,
b: merged + b's private); merged units take the mean of both views. At p = 0 it is a plain
LayerNorm, at m = 0 it is each model's own LayerNorm: exact at both ends of the size range.
The CNN needs no view norm: its channels are merged or kept private in whole GroupNorm groups,
and GroupNorm normalizes each group over its own channels only, so a widened stage is a plain
GroupNorm with more groups of the same size.

With no private units these classes are the input networks themselves: the digits and fashion
suites build their encoders from them (with `layer_norm`, torch's own LayerNorm), so each network
is defined once, here, and a merged checkpoint has the state-dict keys of its inputs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

CONFIG = "config.json"
WEIGHTS = "model.safetensors"


class ViewLayerNorm(torch.nn.Module):
    """LayerNorm over a [merged | private a | private b] stream, per model view."""

    def __init__(self, merged: int, private: int, eps: float = 1e-5):
        super().__init__()
        self.merged, self.private, self.eps = merged, private, eps
        width = merged + 2 * private
        self.weight = torch.nn.Parameter(torch.ones(width))
        self.bias = torch.nn.Parameter(torch.zeros(width))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, p = self.merged, self.private
        if p == 0:
            z = self._norm(x)
        else:
            za = self._norm(x[..., : m + p])
            zb = self._norm(torch.cat([x[..., :m], x[..., m + p:]], -1))
            z = torch.cat([(za[..., :m] + zb[..., :m]) / 2, za[..., m:], zb[..., m:]], -1)
        return z * self.weight + self.bias


def layer_norm(merged: int, private: int, eps: float = 1e-5) -> torch.nn.LayerNorm:
    """torch's LayerNorm over a stream with no private units: what the input networks train with.
    ViewLayerNorm at p = 0 is the same function but not the same bits (torch's fused kernel rounds
    differently), so a network keeps the norm it was trained with and PLeaS keeps its own."""
    if private:
        raise ValueError(f"a plain LayerNorm cannot normalize a stream with {private} private units per model")
    return torch.nn.LayerNorm(merged, eps=eps)


Norm = Callable[[int, int, float], torch.nn.Module]  # (merged, private, eps) -> the stream's LayerNorm


def _width(split: list[int]) -> int:
    merged, private = split
    return merged + 2 * private


class WideResidualMLP(torch.nn.Module):
    """embed -> [h + mlp(norm(h))] x L -> final norm; widths from `stream` and `hidden` [merged, private]."""

    def __init__(self, in_features: int, stream: list[int], hidden: list[list[int]], eps: float = 1e-5,
                 norm: Norm = ViewLayerNorm):
        super().__init__()
        width = _width(stream)
        self.embed = torch.nn.Linear(in_features, width)
        self.layers = torch.nn.ModuleList()
        for split in hidden:
            layer = torch.nn.Module()
            layer.norm = norm(*stream, eps)
            layer.mlp = torch.nn.Sequential(torch.nn.Linear(width, _width(split)), torch.nn.GELU(),
                                            torch.nn.Linear(_width(split), width))
            self.layers.append(layer)
        self.final_norm = norm(*stream, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = h + layer.mlp(layer.norm(h))
        return self.final_norm(h)


class ConvLayer(torch.nn.Module):
    """GroupNorm (groups of `group_size` channels) -> GELU -> 3x3 conv; residual when the stage is kept."""

    def __init__(self, c_in: int, c_out: int, group_size: int, residual: bool):
        super().__init__()
        self.norm = torch.nn.GroupNorm(c_in // group_size, c_in)
        self.conv = torch.nn.Conv2d(c_in, c_out, 3, 1 if residual else 2, 1)
        self.residual = residual

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.conv(torch.nn.functional.gelu(self.norm(h)))
        return h + out if self.residual else out


class WideConvNet(torch.nn.Module):
    """stem -> layers (GroupNorm residual convs, a stride-2 conv where the stage changes) -> GELU ->
    pool -> proj -> final norm; stage widths `stages` and `features` as [merged, private]."""

    def __init__(self, in_channels: int, stages: list[list[int]], group_sizes: list[int], layer_stages: list[int],
                 features: list[int], stem: list[int], pool: int, eps: float = 1e-5, norm: Norm = ViewLayerNorm):
        super().__init__()
        widths = [_width(s) for s in stages]
        kernel, stride, padding = stem
        self.pool = pool
        self.stem = torch.nn.Conv2d(in_channels, widths[0], kernel, stride, padding)
        self.layers = torch.nn.ModuleList()
        previous = 0
        for stage in layer_stages:
            self.layers.append(ConvLayer(widths[previous], widths[stage], group_sizes[previous], stage == previous))
            previous = stage
        self.proj = torch.nn.Linear(widths[previous] * pool * pool, _width(features))
        self.final_norm = norm(*features, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for layer in self.layers:
            h = layer(h)
        h = torch.nn.functional.adaptive_avg_pool2d(torch.nn.functional.gelu(h), self.pool).flatten(1)
        return self.final_norm(self.proj(h))


def build(config: dict) -> torch.nn.Module:
    """The (untrained) model a config describes."""
    arch = config.get("architecture")
    if arch == "pleas-residual-mlp":
        return WideResidualMLP(config["in_features"], config["stream"], config["hidden"], config.get("eps", 1e-5))
    if arch == "pleas-fashion-cnn":
        return WideConvNet(config["in_channels"], config["stages"], config["group_sizes"], config["layer_stages"],
                           config["features"], config["stem"], config["pool"], config.get("eps", 1e-5))
    raise ValueError(f"not a PLeaS model config: architecture={arch!r}")


def load(directory: str | Path) -> tuple[torch.nn.Module, dict[str, torch.nn.Linear]]:
    """The merged encoder and each task's head (reading its slice of the features), ready for eval."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / CONFIG).read_text())
    model = build(config)
    model.load_state_dict(load_file(str(directory / WEIGHTS)))
    heads = {}
    for task in config["tasks"]:
        path = directory / "heads" / f"{task}.safetensors"
        if path.is_file():
            state = load_file(str(path))
            head = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
            head.load_state_dict(state)
            heads[task] = head.eval()
    return model.eval(), heads
