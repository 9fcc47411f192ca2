"""Per-tensor method parameters (`params.tensor_params`): the first rule whose regex matches a
tensor's whole name gives it its parameters over the method's own, at 1x and in every group of
a larger size; preprocessing (DARE, the TIES trim) follows each tensor's own parameters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from flexmerge import get_method
from flexmerge.cli import app

runner = CliRunner()
RULES = [{"match": r"layers\.1\..*", "params": {"lam": 0.5}},
         {"match": r".*mlp.*", "params": {"lam": 2.0, "weights": {"task0": 3.0}}}]


def _config(tmp_path: Path, zoo, method: str, params: dict, size: float) -> Path:
    base, models = zoo
    doc = {"base": str(base), "models": {n: str(p) for n, p in models.items()}, "method": method,
           "params": params, "size": size}
    (tmp_path / "flex.yml").write_text(yaml.safe_dump(doc))
    return tmp_path / "flex.yml"


def _merge_and_export(tmp_path: Path, config: Path, task: str = "task0") -> tuple[dict, dict[str, torch.Tensor]]:
    r = runner.invoke(app, ["merge", "--config", str(config), "--out", str(tmp_path / "art")])
    assert r.exit_code == 0, r.output
    out = tmp_path / f"{task}.safetensors"
    assert runner.invoke(app, ["export", str(tmp_path / "art"), "--task", task, "--out", str(out)]).exit_code == 0
    return json.loads((tmp_path / "art" / "manifest.json").read_text()), load_file(out)


def _rule_for(key: str) -> tuple[float, dict[str, float]]:
    """(λ, weights) of a tensor under RULES over lam 1, weights {task1: 0.5}: the first match wins."""
    if key.startswith("layers.1."):
        return 0.5, {"task1": 0.5}
    if "mlp" in key:
        return 2.0, {"task0": 3.0}
    return 1.0, {"task1": 0.5}


def test_each_tensor_merges_with_the_first_rule_that_matches_it(zoo, tmp_path):
    base, models = zoo
    config = _config(tmp_path, zoo, "task_arithmetic",
                     {"lam": 1.0, "convention": "sum", "weights": {"task1": 0.5}, "tensor_params": RULES}, 1)
    manifest, got = _merge_and_export(tmp_path, config)
    assert manifest["method"]["tensor_params"] == RULES
    theta0 = load_file(base)
    states = {n: load_file(p) for n, p in models.items()}
    for key, x0 in theta0.items():
        if key == "embed.weight":  # equal in every model: frozen, not merged
            continue
        lam, weights = _rule_for(key)
        expected = x0 + lam * sum(weights.get(n, 1.0) * (s[key] - x0) for n, s in states.items())
        torch.testing.assert_close(got[key], expected, rtol=0, atol=1e-6, msg=key)


def test_in_a_larger_size_every_merged_group_keeps_its_tensors_parameters(zoo, tmp_path):
    base, models = zoo
    config = _config(tmp_path, zoo, "task_arithmetic",
                     {"lam": 1.0, "convention": "mean", "weights": {"task1": 0.5}, "tensor_params": RULES}, 2)
    r = runner.invoke(app, ["merge", "--config", str(config), "--out", str(tmp_path / "art")])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    theta0 = load_file(base)
    states = {n: load_file(p) for n, p in models.items()}
    exports = {}
    for task in models:
        out = tmp_path / f"{task}.safetensors"
        assert runner.invoke(app, ["export", str(tmp_path / "art"), "--task", task, "--out", str(out)]).exit_code == 0
        exports[task] = load_file(out)
    checked = 0
    for block in manifest["blocks"]:
        for group in block["groups"]:
            names = [manifest["tasks"][i] for i in group]
            if len(names) < 2:
                continue
            for key in (part["key"] for part in block["parts"]):
                lam, weights = _rule_for(key)
                w = {n: weights.get(n, 1.0) for n in names}
                expected = theta0[key] + lam * sum(w[n] * (states[n][key] - theta0[key]) for n in names) / sum(
                    w.values())
                torch.testing.assert_close(exports[names[0]][key], expected, rtol=0, atol=1e-6, msg=key)
                checked += 1
    assert checked  # at 2x of 4 tasks, some blocks merge groups


def test_dare_and_the_trim_follow_each_tensors_own_rate(zoo, tmp_path):
    base, models = zoo
    rules = [{"match": r"layers\.0\..*", "params": {"dare": 0.8}}, {"match": r"layers\.2\..*", "params": {"keep": 0.1}}]
    config = _config(tmp_path, zoo, "ties", {"keep": 1.0, "trim": "floor", "trim_scope": "tensor", "lam": 1.0,
                                             "combine": "sum", "tensor_params": rules}, 1)
    _, got = _merge_and_export(tmp_path, config)
    theta0 = load_file(base)
    states = [load_file(p) for p in models.values()]
    unchanged = {k: float((got[k] == theta0[k]).float().mean()) for k in theta0 if k != "embed.weight"}
    for key, fraction in unchanged.items():
        if key.startswith("layers.0.") and key.endswith("weight") and theta0[key].numel() >= 256:
            assert 0.30 < fraction < 0.50, (key, fraction)  # 4 tasks each dropping 80%: 0.8^4 = 0.41 untouched
        elif key.startswith("layers.1."):
            taus = torch.stack([s[key] - theta0[key] for s in states])  # keep 1, no DARE: TIES' sum of the agreeing
            sign = torch.where(taus.sum(0) >= 0, 1.0, -1.0)
            expected = theta0[key] + (taus * (taus.sign() == sign)).sum(0)
            torch.testing.assert_close(got[key], expected, rtol=0, atol=1e-6, msg=key)
        elif key.startswith("layers.2.") and theta0[key].numel() >= 256:
            assert fraction > 0.6, (key, fraction)  # each task keeps its top 10%: most entries untouched


@pytest.mark.parametrize("rules, message", [
    ([{"match": "layers.(", "params": {"lam": 1}}], "tensor_params.0.match: invalid regex 'layers.('"),
    ([{"match": ".*", "params": {"dtype": "float16"}}], "dtype cannot differ by tensor"),
    ([{"match": ".*", "params": {"lamb": 1}}], "tensor_params[0] ('.*'): invalid parameters for method "
                                               "'task_arithmetic': lamb: Extra inputs are not permitted"),
    ([{"match": ".*", "params": {"weights": {"nobody": 1}}}], "weights name 'nobody', not among the tasks"),
])
def test_a_bad_rule_is_a_one_line_error(zoo, tmp_path, rules, message):
    config = _config(tmp_path, zoo, "task_arithmetic", {"lam": 1.0, "tensor_params": rules}, 1)
    r = runner.invoke(app, ["merge", "--config", str(config), "--out", str(tmp_path / "art")])
    assert r.exit_code == 2, r.output
    assert len(r.output.strip().splitlines()) == 1 and message in r.output, r.output


def test_for_key_gives_the_matching_rules_method():
    m = get_method("ties", keep=0.5, tensor_params=[{"match": r".*\.bias", "params": {"keep": 0.2}}])
    assert m.for_key("layers.0.attn.qkv.bias").p.keep == 0.2
    assert m.for_key("layers.0.attn.qkv.weight") is m
    assert "tensor_params" not in get_method("ties").describe()  # recorded only when set
