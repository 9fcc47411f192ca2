"""mergekit configs: `flexmerge merge --config mergekit.yml` gives the artifact of the equivalent
flexmerge config, follows mergekit's formulas at 1x, and refuses what flexmerge cannot honour."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from flexmerge.cli import app
from flexmerge.mergekit import task_name

runner = CliRunner()


def _mergekit_yaml(root: Path, models: dict[str, Path], method: str, model_params: dict | None = None,
                   parameters: dict | None = None, **top) -> Path:
    doc = {"merge_method": method, "base_model": "zoo/base.safetensors",
           "models": [{"model": f"zoo/{p.name}", **({"parameters": model_params} if model_params else {})}
                      for p in models.values()], **top}
    if parameters:
        doc["parameters"] = parameters
    (root / "mergekit.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return root / "mergekit.yml"


def _flexmerge_yaml(root: Path, models: dict[str, Path], method: str, params: dict, size: float) -> Path:
    doc = {"base": "zoo/base.safetensors", "models": {n: f"zoo/{p.name}" for n, p in models.items()},
           "method": method, "params": params, "size": size}
    (root / "flexmerge.yml").write_text(yaml.safe_dump(doc))
    return root / "flexmerge.yml"


def _merge(config: Path, out: Path, *extra: str):
    return runner.invoke(app, ["merge", "--config", str(config), "--out", str(out), *extra])


def _artifact(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    manifest = json.loads((path / "manifest.json").read_text())
    tensors = {k: v for s in manifest["shards"] for k, v in load_file(path / s["file"]).items()}
    return manifest, tensors


CASES = [  # (mergekit method, per-model parameters, global parameters, extra keys, flexmerge method, params)
    ("task_arithmetic", {"weight": 0.5}, {"lambda": 1.2}, {},
     "task_arithmetic", {"lam": 0.6, "convention": "sum"}),
    ("task_arithmetic", None, {"weight": 0.7, "normalize": True, "lambda": 0.9}, {},
     "task_arithmetic", {"lam": 0.9, "convention": "mean"}),
    ("ties", {"weight": 1.0, "density": 0.3}, {"lambda": 0.9, "int8_mask": True}, {"dtype": "float16"},
     "ties", {"keep": 0.3, "trim": "floor", "trim_scope": "tensor", "lam": 0.9, "combine": "mean", "dtype": "float16"}),
    ("dare_ties", {"weight": 0.5, "density": 0.6}, None, {"out_dtype": "bfloat16", "dtype": "float32"},
     "ties", {"keep": 1.0, "dare": 0.4, "combine": "sum", "lam": 0.5, "dtype": "bfloat16"}),
    ("dare_linear", {"weight": 1.0, "density": 0.7}, {"normalize": True}, {},
     "dare", {"dare": 0.3, "convention": "mean", "lam": 1.0}),
]


@pytest.mark.parametrize("method, model_params, parameters, top, fm_method, fm_params", CASES)
def test_a_mergekit_config_gives_the_artifact_of_the_equivalent_flexmerge_config(
        zoo, tmp_path, method, model_params, parameters, top, fm_method, fm_params):
    _, models = zoo
    mk = _mergekit_yaml(tmp_path, models, method, model_params, parameters, size=2, **top)
    fm = _flexmerge_yaml(tmp_path, models, fm_method, fm_params, 2)
    r = _merge(mk, tmp_path / "from-mergekit")
    assert r.exit_code == 0, r.output
    assert _merge(fm, tmp_path / "from-flexmerge").exit_code == 0
    (m1, t1), (m2, t2) = _artifact(tmp_path / "from-mergekit"), _artifact(tmp_path / "from-flexmerge")
    assert m1["tasks"] == m2["tasks"] == list(models)
    assert m1["method"] == m2["method"] and m1["blocks"] == m2["blocks"] and m1["size"] == m2["size"]
    assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)


def _merged_1x(tmp_path: Path, config: Path, key: str) -> torch.Tensor:
    r = runner.invoke(app, ["merge", "--config", str(config), "--out", str(tmp_path / "one")])
    assert r.exit_code == 0, r.output
    out = tmp_path / "task0.safetensors"
    assert runner.invoke(app, ["export", str(tmp_path / "one"), "--task", "task0", "--out", str(out)]).exit_code == 0
    return load_file(out)[key]


def test_task_arithmetic_at_1x_is_mergekits_formula(zoo, tmp_path):
    base, models = zoo
    key = "layers.1.mlp.fc1.weight"
    theta0 = load_file(base)[key]
    taus = torch.stack([load_file(p)[key] - theta0 for p in models.values()])
    config = _mergekit_yaml(tmp_path, models, "task_arithmetic", {"weight": 0.4}, {"lambda": 1.5}, size=1)
    expected = theta0 + 1.5 * (0.4 * taus).sum(0)  # mergekit: base + λ Σ w τ (normalize: false)
    torch.testing.assert_close(_merged_1x(tmp_path, config, key), expected, rtol=0, atol=1e-6)


def _magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit's `sparsify.magnitude`: the int(density·numel) largest magnitudes of one tensor."""
    k = int(density * tensor.numel())
    mask = torch.zeros_like(tensor)
    mask.view(-1)[torch.argsort(tensor.abs().view(-1), descending=True)[:k]] = 1
    return tensor * mask


@pytest.mark.parametrize("density", [1.0, 0.3])
def test_ties_at_1x_is_mergekits_formula(zoo, tmp_path, density):
    base, models = zoo
    key = "layers.0.attn.qkv.weight"
    theta0 = load_file(base)[key]
    taus = [_magnitude(load_file(p)[key] - theta0, density) for p in models.values()]
    weighted = 0.8 * torch.stack(taus)
    config = _mergekit_yaml(tmp_path, models, "ties", {"weight": 0.8, "density": density}, {"lambda": 0.7}, size=1)
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)  # mergekit get_mask("sum"), normalize: true
    mask = weighted.sign() == sign
    divisor = (0.8 * mask).sum(0)
    divisor[divisor == 0] = 1
    expected = theta0 + 0.7 * (weighted * mask).sum(0) / divisor
    torch.testing.assert_close(_merged_1x(tmp_path, config, key), expected, rtol=0, atol=1e-6)


def test_the_base_listed_among_models_is_skipped_and_task_names_come_from_paths(zoo, tmp_path):
    _, models = zoo
    for i, (name, p) in enumerate(models.items()):  # two of them in folders as ckpt.safetensors
        if i < 2:
            (tmp_path / f"run {i}").mkdir()
            shutil.copy(p, tmp_path / f"run {i}" / "ckpt.safetensors")
    doc = {"merge_method": "task_arithmetic", "base_model": "zoo/base.safetensors", "size": 3,
           "parameters": {"weight": 1.0},
           "models": [{"model": "zoo/base.safetensors"}, {"model": "run 0/ckpt.safetensors"},
                      {"model": "run 1/ckpt.safetensors"}, {"model": "zoo/task2.safetensors"}]}
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(doc))
    assert _merge(tmp_path / "mk.yml", tmp_path / "out").exit_code == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["tasks"] == ["ckpt", "ckpt-2", "task2"]
    assert task_name(Path("x/My Model (v2)!"), []) == "My-Model-v2-"
    assert task_name(Path("x/..hidden.safetensors.index.json"), ["hidden"]) == "hidden-2"


@pytest.mark.parametrize("change, message", [
    ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}]}, "slices"),
    ({"tokenizer_source": "union"}, "tokenizer surgery (tokenizer_source)"),
    ({"chat_template": "chatml"}, "chat_template is not supported"),
    ({"merge_method": "slerp"}, "merge_method 'slerp' has no flexmerge equivalent; supported: task_arithmetic"),
    ({"unequal": True, "merge_method": "ties", "parameters": {"weight": 1.0, "density": 0.3}},
     "the models' density values differ (task0: 0.3, task1: 0.5"),
    ({"parameters": {"weight": [0.1, 0.5, 1.0]}}, "parameters.weight is a gradient"),
    ({"parameters": {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]}}, "per-tensor values"),
    ({"parameters": {"gamma": 0.01, "weight": 1}}, "parameter(s) 'gamma' not supported"),
    ({"parameters": {"weight": 1, "rescale": False}, "merge_method": "dare_ties"}, "rescale: false"),
    ({"parameters": {"weight": 1, "rescale": True}, "merge_method": "ties"}, "rescale: true"),
    ({"parameters": {"weight": 1, "density": 0}, "merge_method": "ties"}, "density must be in (0, 1]"),
    ({"parameters": {"weight": 1, "normalize": "yes"}}, "parameters.normalize must be true or false"),
    ({"parameters": {}}, "model 'task0' has no weight; mergekit requires parameters.weight"),
    ({"parameters": {"weight": 0}}, "weight 0 merges nothing"),
    ({"dtype": "int8"}, "dtype 'int8' is not supported"),
    ({"hub": "meta-llama/Llama-3.1-8B"}, "'meta-llama/Llama-3.1-8B' is not a local path (a Hugging Face Hub id?)"),
    ({"hub": "zoo/task0.safetensors+loras/a"}, "applies a LoRA on load"),
    ({"hub": "nowhere/x/y.safetensors"}, "not found (relative paths are taken from the config's folder"),
    ({"method": "ties"}, "unknown key(s) 'method'"),
    ({"base_model": None}, "task_arithmetic needs base_model"),
])
def test_what_flexmerge_cannot_honour_is_a_clear_error(zoo, tmp_path, change, message):
    _, models = zoo
    doc = {"merge_method": "task_arithmetic", "base_model": "zoo/base.safetensors", "size": 2,
           "parameters": {"weight": 1.0}, "models": [{"model": f"zoo/{p.name}"} for p in models.values()]}
    change = dict(change)
    if change.pop("unequal", False):
        doc["models"][1]["parameters"] = {"density": 0.5}
    if "hub" in change:
        doc["models"][0]["model"] = change.pop("hub")
    doc.update(change)
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(doc))
    r = _merge(tmp_path / "mk.yml", tmp_path / "out")
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split()), r.output
    assert not (tmp_path / "out").exists()
