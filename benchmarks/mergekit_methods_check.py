"""flexmerge's mergekit methods against mergekit itself, tensor by tensor, on the tests' tiny zoo.

tests/test_mergekit_methods.py checks each method against mergekit's formula written in the test;
this script checks those methods against mergekit's own code (its registered methods called on
each tensor), so the transcription itself is checked. It needs mergekit importable beside
flexmerge, e.g. the venv that benchmarks/vs_mergekit.py installs:

    PYTHONPATH=. ~/.cache/flexmerge/vs_mergekit/venv/bin/python benchmarks/mergekit_methods_check.py

Deterministic methods: the largest |flexmerge − mergekit| over every merged tensor at 1x (float32).
Random ones (della, della_linear, dare_linear): the fraction of entries kept in each fifth of the
magnitude ranks of each row, and the ratio of each tensor's L1 norm after to before sparsifying,
flexmerge's seeded draws next to mergekit's torch.bernoulli. A check, not a test.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import flexmerge
from flexmerge.preprocess import L1Rescale, MagPrune, Pipeline

SHAPES = {"embed.weight": (20, 16), "attn.qkv.weight": (48, 16), "attn.qkv.bias": (48,), "norm.weight": (16,),
          "mlp.fc1.weight": (64, 16), "mlp.fc2.weight": (16, 64)}


def write_zoo(root: Path, num_tasks: int = 3) -> tuple[Path, dict[str, Path]]:
    """A random base and fine-tunes of it (a shared drift plus each task's own; embed frozen)."""
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    root.mkdir(parents=True)
    save_file(base, str(root / "base.safetensors"))
    drift = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
    models = {}
    for t in range(num_tasks):
        own = {k: v if k == "embed.weight" else v + 0.03 * drift[k] + 0.03 * torch.randn(v.shape, generator=g)
               for k, v in base.items()}
        models[f"task{t}"] = root / f"task{t}.safetensors"
        save_file(own, str(models[f"task{t}"]))
    return root / "base.safetensors", models

WEIGHTS = {"task0": 0.3, "task1": 1.0, "task2": 0.6}

# (flexmerge method, params, tasks, mergekit method, mergekit parameters, base in the group, entries)
# entries: "tasks" (the fine-tunes, base apart), "with_base" (base first as an input: mergekit's
# two-model methods, whose base_model is flexmerge's first task), "models_only" (no base input)
CASES = [
    ("linear", {"weights": WEIGHTS}, 3, "linear", {"weight": list(WEIGHTS.values())}, "models_only"),
    ("linear", {"weights": WEIGHTS, "normalize": False}, 3, "linear",
     {"weight": list(WEIGHTS.values()), "normalize": False}, "models_only"),
    ("task_arithmetic", {"weights": WEIGHTS, "convention": "sum", "lam": 1.3}, 3, "task_arithmetic",
     {"weight": list(WEIGHTS.values()), "lambda": 1.3}, "tasks"),
    ("ties", {"weights": WEIGHTS, "keep": 1.0, "lam": 0.8}, 3, "ties",
     {"weight": list(WEIGHTS.values()), "lambda": 0.8, "density": 1.0}, "tasks"),
    ("breadcrumbs", {"density": 0.6, "gamma": 0.05, "weights": WEIGHTS, "lam": 1.2}, 3, "breadcrumbs",
     {"weight": list(WEIGHTS.values()), "density": 0.6, "gamma": 0.05, "lambda": 1.2}, "tasks"),
    ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.1, "normalize": True, "rescale": True}, 3, "breadcrumbs_ties",
     {"weight": 1.0, "density": 0.5, "gamma": 0.1, "normalize": True, "rescale": True}, "tasks"),
    ("sce", {}, 3, "sce", {}, "tasks"),
    ("sce", {"select_topk": 0.4}, 3, "sce", {"select_topk": 0.4}, "tasks"),
    ("model_stock", {}, 3, "model_stock", {}, "tasks"),
    ("model_stock", {"filter_wise": True}, 3, "model_stock", {"filter_wise": True}, "tasks"),
    ("slerp", {"t": 0.3}, 2, "slerp", {"t": 0.3}, "first_is_base"),
    ("nuslerp", {"weights": {"task0": 0.7, "task1": 0.4}}, 2, "nuslerp", {"weight": [0.7, 0.4]}, "tasks"),
    ("nuslerp", {"space": "weights", "nuslerp_flatten": False, "nuslerp_row_wise": True}, 2, "nuslerp",
     {"weight": [1.0, 1.0], "nuslerp_flatten": False, "nuslerp_row_wise": True}, "models_only"),
    ("multislerp", {"weights": WEIGHTS}, 3, "multislerp", {"weight": list(WEIGHTS.values())}, "tasks"),
    ("multislerp", {"space": "weights"}, 3, "multislerp", {"weight": 1.0}, "models_only"),
    ("karcher", {}, 3, "karcher", {}, "models_only"),
    ("nearswap", {"t": 0.02}, 2, "nearswap", {"t": 0.02}, "first_is_base"),
    ("arcee_fusion", {}, 2, "arcee_fusion", {}, "first_is_base"),
    ("ram", {"epsilon": 0.02}, 3, "ram", {"epsilon": 0.02}, "tasks"),
    ("ramplus_tl", {"epsilon": 0.02, "r": 0.5, "alpha": 0.3}, 3, "ramplus_tl",
     {"epsilon": 0.02, "r": 0.5, "alpha": 0.3}, "tasks"),
]


def mergekit_merge(name: str, params: dict, theta0: torch.Tensor, thetas: list[torch.Tensor], entries: str):
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    if entries == "tasks":
        group = TensorGroup.from_tensors([theta0, *thetas], base_index=0)
    elif entries == "first_is_base":
        group = TensorGroup.from_tensors(thetas, base_index=0)
    else:
        group = TensorGroup.from_tensors(thetas)
    return registry.get(name)([group], parameters=params)[0]


def check_deterministic(root: Path) -> float:
    base, models = write_zoo(root / "zoo")
    theta0 = load_file(base)
    worst = 0.0
    for fm_name, fm_params, n, mk_name, mk_params, entries in CASES:
        chosen = dict(list(models.items())[:n])
        thetas = [load_file(p) for p in chosen.values()]
        merged = flexmerge.merge(flexmerge.load_tasks(base, chosen), size=1, method=fm_name,
                                 params=fm_params).state_dict("task0")
        diff = 0.0
        for key in theta0:
            if key == "embed.weight":  # frozen: equal in every model
                continue
            mk = mergekit_merge(mk_name, mk_params, theta0[key], [t[key] for t in thetas], entries)
            diff = max(diff, float((merged[key] - mk).abs().max()))
        worst = max(worst, diff)
        print(f"{fm_name:18s} {str(fm_params)[:60]:60s} max |flexmerge - mergekit| = {diff:.2e}")
    return worst


def rank_fifths(delta: torch.Tensor, kept: torch.Tensor) -> list[float]:
    """Fraction kept in each fifth of the magnitude ranks of each row (a 2-D tensor's rows)."""
    ranks = delta.abs().argsort(dim=1).argsort(dim=1).float() / (delta.shape[1] - 1)
    bins = (ranks * 5).clamp(max=4.999).long()
    return [float((kept != 0)[bins == b].float().mean()) for b in range(5)]


def check_della(root: Path) -> None:
    from mergekit.sparsify import RescaleNorm, della_magprune

    base, models = write_zoo(root / "zoo-della", num_tasks=2)
    tasks = flexmerge.load_tasks(base, models)
    key = "mlp.fc1.weight"
    density, epsilon = 0.4, 0.2
    pipe = Pipeline([L1Rescale(MagPrune(density, epsilon, seed=0))]).fit(tasks)
    ours = torch.cat([pipe.deltas(tasks, c) for c in tasks.chunks(key)], 1)[0]
    delta = tasks.deltas(next(iter(tasks.chunks(key))))[0]
    torch.manual_seed(0)
    theirs = torch.stack([della_magprune(delta, density, epsilon, RescaleNorm.l1) for _ in range(200)])
    print(f"della keep rate by magnitude fifth (expected {[round(density - epsilon + 2 * epsilon * (b + .5) / 5, 2) for b in range(5)]}):")
    print("  flexmerge", [round(x, 3) for x in rank_fifths(delta, ours)])
    print("  mergekit ", [round(x, 3) for x in rank_fifths(delta.expand_as(theirs[0]).repeat(200, 1),
                                                           theirs.reshape(-1, delta.shape[1]))])
    print(f"  L1 after/before: flexmerge {float(ours.abs().sum() / delta.abs().sum()):.6f}, "
          f"mergekit {float(theirs[0].abs().sum() / delta.abs().sum()):.6f}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        worst = check_deterministic(Path(tmp))
        print(f"largest difference over all deterministic methods: {worst:.2e}")
        check_della(Path(tmp))
