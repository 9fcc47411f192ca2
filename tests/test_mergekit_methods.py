"""mergekit's merge methods and per-model weights as flexmerge methods: each deterministic method's
1x merge equals mergekit's formula, written here from `mergekit/merge_methods/*.py` (0.1.5) on the
tiny zoo; random ones match its statistics; every method merges any group, so every size works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import flexmerge
from flexmerge.cli import app
from flexmerge.errors import ConfigError

runner = CliRunner()
WEIGHTS = {"task0": 0.3, "task1": 1.0, "task2": 0.6}


def _models(zoo, n: int = 3) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], dict[str, Path]]:
    base, models = zoo
    models = dict(list(models.items())[:n])
    return load_file(base), [load_file(p) for p in models.values()], models


def _merged(zoo, method: str, params: dict, n: int = 3, size: float = 1, task: str = "task0",
            **load) -> dict[str, torch.Tensor]:
    """Task `task`'s weights in flexmerge's merge at `size` (1x: the one merged model)."""
    base, models = zoo
    tasks = flexmerge.load_tasks(base, dict(list(models.items())[:n]), **load)
    return flexmerge.merge(tasks, size=size, method=method, params=params).state_dict(task)


def _assert_each_tensor(got: dict[str, torch.Tensor], expected, base: dict[str, torch.Tensor], tol: float = 2e-6):
    """Every merged tensor (the frozen embedding aside) is `expected(key)`."""
    for key in base:
        if key == "embed.weight":
            continue
        torch.testing.assert_close(got[key], expected(key), rtol=tol, atol=tol, msg=key)


# --- per-model weights -----------------------------------------------------------------------------------


def _gta(deltas: torch.Tensor, weights: list[float], consensus: bool, normalize: bool, lam: float) -> torch.Tensor:
    """mergekit's GeneralizedTaskArithmeticMerge.merge_group after sparsification (delta only)."""
    w = torch.tensor(weights).view(-1, *[1] * (deltas.dim() - 1))
    deltas = deltas * w
    if consensus:
        sign = deltas.sign()
        majority = (deltas.sum(0) >= 0).float() * 2 - 1
        mask = (sign == majority).float()
        mixed, divisor = (deltas * mask).sum(0), (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = deltas.sum(0), w.sum(0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return mixed * lam if lam != 1 else mixed


@pytest.mark.parametrize("method, params, consensus, normalize, lam", [
    ("task_arithmetic", {"convention": "sum", "lam": 1.3}, False, False, 1.3),
    ("task_arithmetic", {"convention": "mean", "lam": 0.9}, False, True, 0.9),
    ("ties", {"keep": 1.0, "combine": "mean", "lam": 0.8}, True, True, 0.8),
    ("ties", {"keep": 1.0, "combine": "sum", "lam": 1.0}, True, False, 1.0),
])
def test_per_task_weights_at_1x_are_mergekits_weighted_merge(zoo, method, params, consensus, normalize, lam):
    theta0, thetas, _ = _models(zoo)
    got = _merged(zoo, method, {**params, "weights": WEIGHTS})
    _assert_each_tensor(got, lambda k: theta0[k] + _gta(torch.stack([t[k] - theta0[k] for t in thetas]),
                                                        list(WEIGHTS.values()), consensus, normalize, lam), theta0)


def test_a_group_keeps_its_members_weights_normalized_over_the_group(zoo):
    """At a size between 1x and Mx, a block merged for some tasks only is their weighted mean."""
    base, models = zoo
    tasks = flexmerge.load_tasks(base, dict(list(models.items())[:3]))
    params = {"convention": "mean", "lam": 1.0, "weights": WEIGHTS}
    fm = flexmerge.merge(tasks, size=2, method="task_arithmetic", params=params)
    theta0 = load_file(base)
    thetas = {n: load_file(p) for n, p in models.items()}
    seen = set()
    for b, groups in enumerate(fm.assignment.groups):
        for g in groups:
            names = [tasks.names[t] for t in g]
            key = fm.partition.blocks[b].parts[0].key
            w = torch.tensor([WEIGHTS[n] for n in names]).view(-1, *[1] * theta0[key].dim())
            taus = torch.stack([thetas[n][key] - theta0[key] for n in names])
            expected = theta0[key] + (taus * w).sum(0) / w.sum()
            torch.testing.assert_close(fm.state_dict(names[0])[key], expected, rtol=2e-6, atol=2e-6)
            seen.add(len(g))
    assert 2 in seen  # a group of two was checked, not only copies and the all-task group
    assert fm.method["weights"] == WEIGHTS  # the artifact describes itself


def test_weights_reach_the_planner_of_a_linear_method(zoo):
    """Merged-vector planning scores a group by its weighted merge: weights change the path."""
    base, models = zoo
    tasks = flexmerge.load_tasks(base, models)
    plain = flexmerge.plan(tasks, method="task_arithmetic", mode="merged")
    weighted = flexmerge.plan(tasks, method="task_arithmetic", mode="merged",
                              params={"weights": {"task0": 50.0, "task3": 0.01}})
    assert [s.similarity for s in plain.steps] != [s.similarity for s in weighted.steps]


def test_weights_are_refused_where_they_cannot_apply(zoo):
    base, models = zoo
    tasks = flexmerge.load_tasks(base, models)
    with pytest.raises(ConfigError, match="method 'iso_c' takes no per-task weights .* methods that do: .*ties"):
        flexmerge.merge(tasks, size=1, method="iso_c", params={"weights": {"task0": 2.0}})
    with pytest.raises(ConfigError, match=r"weights name 'nope', not among the tasks \(task0, task1, task2, task3\)"):
        flexmerge.merge(tasks, size=1, method="ties", params={"weights": {"nope": 2.0}})


def test_the_cli_takes_a_weight_per_task(zoo, tmp_path):
    base, models = zoo
    args = ["merge", "--base", str(base), *[f"--model={n}={p}" for n, p in list(models.items())[:3]],
            "--method", "task_arithmetic", "--param", "convention=sum", "--param", "lam=1.0", "--size", "1"]
    r = runner.invoke(app, [*args, "--weight", "task0=0.3", "--weight", "task2=0.6", "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["method"]["weights"] == {"task0": 0.3, "task2": 0.6}
    r = runner.invoke(app, [*args, "--weight", "task0=x", "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "--weight 'task0=x' must be NAME=W" in r.output


def test_a_mergekit_config_with_unequal_weights_runs_at_1x_as_mergekit(zoo, tmp_path):
    base, models = zoo
    doc = {"merge_method": "ties", "base_model": "zoo/base.safetensors", "size": 1,
           "parameters": {"density": 1.0, "lambda": 0.9},
           "models": [{"model": f"zoo/{n}.safetensors", "parameters": {"weight": w}} for n, w in WEIGHTS.items()]}
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(doc))
    r = runner.invoke(app, ["merge", "--config", str(tmp_path / "mk.yml"), "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    out = tmp_path / "task0.safetensors"
    assert runner.invoke(app, ["export", str(tmp_path / "out"), "--task", "task0", "--out", str(out)]).exit_code == 0
    theta0, thetas, _ = _models(zoo)
    _assert_each_tensor(load_file(out), lambda k: theta0[k] + _gta(torch.stack([t[k] - theta0[k] for t in thetas]),
                                                                   list(WEIGHTS.values()), True, True, 0.9), theta0)
