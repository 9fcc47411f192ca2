"""A widened residual MLP (torch only): the model class of a PLeaS checkpoint.

This file imports nothing from flexmerge; `flexmerge pleas` copies it next to the weights, so
the output loads with torch alone: `import modeling_pleas; model, heads = modeling_pleas.load(DIR)`.

Every permuted axis is laid out as [merged (m) | model a's private (p) | model b's private (p)].
`ViewLayerNorm` normalizes the residual stream as each model sees it (a: merged + a's private,
b: merged + b's private); merged units take the mean of both views. At p = 0 it is a plain
LayerNorm, at m = 0 it is each model's own LayerNorm: exact at both ends of the size range.
"""

from __future__ import annotations

import json
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


def _width(split: list[int]) -> int:
    merged, private = split
    return merged + 2 * private


class WideResidualMLP(torch.nn.Module):
    """embed -> [h + mlp(norm(h))] x L -> final norm; widths from `stream` and `hidden` [merged, private]."""

    def __init__(self, in_features: int, stream: list[int], hidden: list[list[int]], eps: float = 1e-5):
        super().__init__()
        width = _width(stream)
        self.embed = torch.nn.Linear(in_features, width)
        self.layers = torch.nn.ModuleList()
        for split in hidden:
            layer = torch.nn.Module()
            layer.norm = ViewLayerNorm(*stream, eps=eps)
            layer.mlp = torch.nn.Sequential(torch.nn.Linear(width, _width(split)), torch.nn.GELU(),
                                            torch.nn.Linear(_width(split), width))
            self.layers.append(layer)
        self.final_norm = ViewLayerNorm(*stream, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = h + layer.mlp(layer.norm(h))
        return self.final_norm(h)


def build(config: dict) -> WideResidualMLP:
    """The (untrained) model a config describes."""
    if config.get("architecture") != "pleas-residual-mlp":
        raise ValueError(f"not a PLeaS residual-MLP config: architecture={config.get('architecture')!r}")
    return WideResidualMLP(config["in_features"], config["stream"], config["hidden"], config.get("eps", 1e-5))


def load(directory: str | Path) -> tuple[WideResidualMLP, dict[str, torch.nn.Linear]]:
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
