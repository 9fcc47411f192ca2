"""The CLI end to end on tiny models: plan, merge (flags and YAML), inspect, export, help."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from flexmerge.cli import app

runner = CliRunner()


def _model_flags(models):
    flags = []
    for name, path in models.items():
        flags += ["--model", f"{name}={path}"]
    return flags


def test_plan_merge_inspect_export(zoo, tmp_path):
    base, models = zoo
    r = runner.invoke(app, ["plan", "--base", str(base), *_model_flags(models), "--method", "ties",
                            "--param", "keep=0.3", "--out", str(tmp_path / "path.json")])
    assert r.exit_code == 0, r.output
    path = json.loads((tmp_path / "path.json").read_text())
    assert path["method"]["keep"] == 0.3 and path["sizes"][0] == 4 and path["min_size"] == pytest.approx(1)
    assert len(path["steps"]) == len(path["blocks"]) * 3

    r = runner.invoke(app, ["merge", "--base", str(base), *_model_flags(models), "--method", "ties",
                            "--size", "2", "--out", str(tmp_path / "flex")])
    assert r.exit_code == 0, r.output
    assert "size 2.0000x" in r.output or "size 1.9" in r.output

    r = runner.invoke(app, ["inspect", str(tmp_path / "flex"), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["tasks"] == list(models) and info["method"]["name"] == "ties" and info["size"] <= 2
    assert all(sorted(t for g in b["groups"] for t in g) == sorted(models) for b in info["blocks"])
    r = runner.invoke(app, ["inspect", str(tmp_path / "flex")])
    assert r.exit_code == 0 and "layers.0.attn" in r.output

    r = runner.invoke(app, ["export", str(tmp_path / "flex"), "--task", "task2", "--out", str(tmp_path / "t2.safetensors")])
    assert r.exit_code == 0, r.output
    exported = load_file(tmp_path / "t2.safetensors")
    assert exported.keys() == load_file(models["task2"]).keys()


def test_merge_from_yaml_config_with_flag_override(zoo, tmp_path):
    base, models = zoo
    cfg = tmp_path / "merge.yaml"
    lines = [f"base: {base}", "models:"] + [f"  {n}: {p}" for n, p in models.items()]
    lines += ["method: task_arithmetic", "params:", "  lam: 1.0", "granularity: layer", "size: 4"]
    cfg.write_text("\n".join(lines) + "\n")
    r = runner.invoke(app, ["merge", "--config", str(cfg), "--size", "1", "--out", str(tmp_path / "flex")])
    assert r.exit_code == 0, r.output
    info = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "flex"), "--json"]).output)
    assert info["size"] == pytest.approx(1.0) and info["granularity"] == "layer"
    assert info["method"]["lam"] == 1.0
    sd = {n: load_file(p) for n, p in models.items()}
    runner.invoke(app, ["export", str(tmp_path / "flex"), "--task", "task0", "--out", str(tmp_path / "m.safetensors")])
    merged = load_file(tmp_path / "m.safetensors")
    k = "layers.1.mlp.fc1.weight"
    base_sd = load_file(base)
    expected = base_sd[k] + torch.stack([s[k] - base_sd[k] for s in sd.values()]).mean(0)
    torch.testing.assert_close(merged[k], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["merge", "--out", "x"], "base"),
    (["merge", "--size", "2", "--out", "x", "--method", "nope"], "unknown merging method 'nope'"),
    (["merge", "--out", "x", "--method", "ties"], "--size"),
    (["merge", "--size", "0.5", "--out", "x"], "below the smallest size"),
    (["merge", "--size", "2", "--out", "x", "--param", "keep"], "KEY=VALUE"),
    (["merge", "--size", "2", "--out", "x", "--granularity", "blocks"], "unknown granularity 'blocks'"),
])
def test_cli_errors_are_clear(zoo, tmp_path, argv, message):
    base, models = zoo
    extra = [] if argv == ["merge", "--out", "x"] else ["--base", str(base), *_model_flags(models)]
    argv = [a if a != "x" else str(tmp_path / "x") for a in argv]
    r = runner.invoke(app, [*argv, *extra])
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("command", ["plan", "merge", "inspect", "export", "methods"])
def test_every_command_has_help(command):
    r = runner.invoke(app, [command, "--help"])
    assert r.exit_code == 0 and "Usage" in r.output


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "flexmerge", "methods"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "task_arithmetic" in out.stdout and "emr" in out.stdout


def test_wrong_base_is_refused_unless_the_limit_is_raised(zoo, tmp_path):
    from safetensors.torch import save_file

    from tests.conftest import tiny_state_dict

    _, models = zoo
    save_file(tiny_state_dict(seed=5), str(tmp_path / "other.safetensors"))
    argv = ["plan", "--base", str(tmp_path / "other.safetensors"), *_model_flags(models), "--out", str(tmp_path / "p.json")]
    r = runner.invoke(app, argv)
    assert r.exit_code == 2 and "does not look like the model it was fine-tuned from" in r.output
    r = runner.invoke(app, [*argv, "--max-relative-change", "10"])
    assert r.exit_code == 0, r.output


def test_merge_and_plan_take_a_method_spec_as_sweep_does(zoo, tmp_path):
    """`--method twin:rank=2` (the sweep's syntax) works in merge and plan; `--param` adds to it."""
    base, models = zoo
    r = runner.invoke(app, ["merge", "--base", str(base), *_model_flags(models), "--method", "ties:keep=0.3",
                            "--param", "lam=0.9", "--size", "2", "--out", str(tmp_path / "flex")])
    assert r.exit_code == 0, r.output
    method = json.loads((tmp_path / "flex" / "manifest.json").read_text())["method"]
    assert (method["name"], method["keep"], method["lam"]) == ("ties", 0.3, 0.9)
    r = runner.invoke(app, ["plan", "--base", str(base), *_model_flags(models), "--method", "twin:rank=2",
                            "--out", str(tmp_path / "path.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "path.json").read_text())["method"]["rank"] == 2
    r = runner.invoke(app, ["merge", "--base", str(base), *_model_flags(models), "--method", "twin:rank=x",
                            "--size", "2", "--out", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "invalid parameters for method 'twin'" in r.output, r.output
