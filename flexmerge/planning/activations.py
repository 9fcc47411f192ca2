"""Unlabelled calibration inputs, and the per-task input statistics a data-aware planner needs.

For a linear layer y = W x + b run on task t's inputs X_t (N tokens), changing W by Δ changes the
outputs by ||Δ X_tᵀ||² = tr(Δ C_t Δᵀ) with C_t = X_tᵀ X_t; changing b by δ changes them by N||δ||².
A Conv2d is the same linear map on every input patch (X_t: the unfolded k×k patches, N: images x
output positions; Δ flattened to (out, C·k·k)). A LayerNorm's γ, β act the same way on its
normalized input x̂ (diagonal: Σ_n x̂²); a GroupNorm's per channel, summed over every position. These "metrics"
come from one forward pass of each fine-tuned model over its own task's inputs (forward hooks);
a planner then scores any candidate fusion from task vectors and metrics alone. C_t is kept as a
rank-r factor F (r x in, FᵀF ≈ C_t, top eigenvectors) so scoring costs O(rows · in · r).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from flexmerge.errors import ConfigError
from flexmerge.taskvec import TaskSet

DEFAULT_RANK = 64
TOKENS = "<tokens>"  # the task's calibration token count, the weight of parameters no hook measures


@dataclass
class Calibration:
    """A few unlabelled inputs per task and how to run them (what a suite hands a data-aware planner).

    `model` is the encoder architecture: each task's fine-tuned state dict is loaded into it and
    `forward(model, inputs[task])` runs it (outputs are ignored; only the layers' inputs count)."""

    model: torch.nn.Module
    inputs: dict[str, Any]
    forward: Callable[[torch.nn.Module, Any], object]


@dataclass
class Metric:
    """How a parameter's change maps to output change on one task, in squared-output units: a factor
    of the input Gram (Linear and Conv2d weights: `factor` (r, in), in = C·k·k for a conv), per-entry
    weights (LayerNorm / GroupNorm γ: `diag`), or one weight for every entry (biases: `uniform`, the
    number of output positions they are added at)."""

    factor: torch.Tensor | None = None
    diag: torch.Tensor | None = None
    uniform: float = 1.0


def task_metrics(tasks: TaskSet, calibration: Calibration, rank: int = DEFAULT_RANK) -> list[dict[str, Metric]]:
    """Per task (in `tasks` order), a Metric for every Linear / Conv2d / LayerNorm / GroupNorm parameter."""
    missing = [t for t in tasks.names if t not in calibration.inputs]
    if missing:
        raise ConfigError(f"calibration inputs are missing for tasks {missing}")
    return [_one_task(tasks, i, calibration, rank) for i in range(tasks.num_tasks)]


def _one_task(tasks: TaskSet, i: int, calibration: Calibration, rank: int) -> dict[str, Metric]:
    model = calibration.model
    model.load_state_dict(tasks.finetuned_state_dict(i), strict=False)
    model.eval()
    stats: dict[str, list] = {}
    handles = [module.register_forward_hook(_hook(name, module, stats))
               for name, module in model.named_modules() if _measurable(module)]
    try:
        with torch.no_grad():
            calibration.forward(model, calibration.inputs[tasks.names[i]])
    finally:
        for h in handles:
            h.remove()
    out: dict[str, Metric] = {}
    for name, (kind, acc, count) in stats.items():
        prefix = f"{name}." if name else ""
        own = Metric(factor=_factor(acc, rank)) if kind == "linear" else Metric(diag=acc.float())
        out[prefix + "weight"], out[prefix + "bias"] = own, Metric(uniform=float(count))
    out[TOKENS] = Metric(uniform=float(max((c for _, _, c in stats.values()), default=1)))
    return out


def _measurable(module: torch.nn.Module) -> bool:
    """The layers whose parameters get an output metric. A conv qualifies when it is one linear map per
    patch that unfold reproduces: 2-D, not grouped, zero padding given as numbers."""
    if isinstance(module, torch.nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.GroupNorm))


def _hook(name: str, module: torch.nn.Module, stats: dict[str, list]):
    """Accumulate the module's input Gram (Linear; Conv2d over unfolded patches) or Σ x̂² per feature
    (LayerNorm; GroupNorm per channel), and the number of output positions (what a bias is added at)."""

    def hook(mod, args, output) -> None:
        x = args[0].detach().double()
        if isinstance(mod, torch.nn.Conv2d):
            patches = torch.nn.functional.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding,
                                                 stride=mod.stride)          # (N, C·k·k, positions)
            x = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            x = x.reshape(-1, x.shape[-1])
            kind, acc, count = "linear", x.T @ x, x.shape[0]
        elif isinstance(mod, torch.nn.GroupNorm):
            xhat = torch.nn.functional.group_norm(x, mod.num_groups, eps=mod.eps).transpose(0, 1)
            kind, acc, count = "norm", (xhat.reshape(xhat.shape[0], -1) ** 2).sum(1), xhat[0].numel()
        else:
            x = x.reshape(-1, x.shape[-1])
            xhat = torch.nn.functional.layer_norm(x, mod.normalized_shape, eps=mod.eps)
            kind, acc, count = "norm", (xhat**2).sum(0), x.shape[0]
        if name in stats:
            stats[name][1] += acc
            stats[name][2] += count
        else:
            stats[name] = [kind, acc, count]

    return hook


def _factor(gram: torch.Tensor, rank: int) -> torch.Tensor:
    """F (r, in) with FᵀF the best rank-r approximation of the PSD Gram matrix."""
    vals, vecs = torch.linalg.eigh(gram)
    vals, vecs = vals.flip(0)[:rank].clamp_min(0), vecs.flip(1)[:, :rank]
    return (vecs * vals.sqrt()).T.float().contiguous()
