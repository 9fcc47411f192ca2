"""Sizes mean what they say: the unit is one whole fine-tune as stored (its own parameters
included, at the dtype the artifact stores), so `--size M` (or `max`) gives every fine-tune back
bit for bit, and `--size 1` with a storage dtype is one fully merged model."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import flexmerge
from flexmerge.cli import app
from tests.conftest import HF_LABELS as LABELS

transformers = pytest.importorskip("transformers")
runner = CliRunner()


def _flags(dirs) -> list[str]:
    return [x for name, d in dirs.items() for x in ("--model", f"{name}={d}")]


def _llama_zoo(root):
    """A tiny Llama with an untied lm_head and three full fine-tunes that train every tensor, the
    head too (a mergeable parameter like the others: the unit is one whole model, 1x reachable)."""
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).eval()
    base.save_pretrained(root / "base")
    dirs = {}
    for i in range(3):
        torch.manual_seed(20 + i)
        ft = transformers.LlamaForCausalLM(config).eval()
        ft.load_state_dict({k: v + 0.01 * torch.randn_like(v) for k, v in base.state_dict().items()})
        ft.save_pretrained(root / f"ft{i}")
        dirs[f"ft{i}"] = root / f"ft{i}"
    return root / "base", dirs


def _weights(model_dir) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def _assert_exports_are_the_fine_tunes(artifact, dirs, tmp_path):
    flex = flexmerge.load(artifact)
    for name, d in dirs.items():
        exported = flexmerge.export(flex, name, tmp_path / f"export-{name}")
        got, want = _weights(exported), _weights(d)
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (name, k)


@pytest.mark.parametrize("size", ["3", "max"])
def test_size_m_gives_back_classifiers_with_heads_of_different_widths(hf_zoo, tmp_path, size):
    base, dirs = hf_zoo
    r = runner.invoke(app, ["merge", "--base", str(base), *_flags(dirs), "--size", size, "--out", str(tmp_path / "f")])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert manifest["size"] == 3.0 and all(len(b["groups"]) == 3 for b in manifest["blocks"])
    _assert_exports_are_the_fine_tunes(tmp_path / "f", dirs, tmp_path)
    ids = torch.tensor([[1, 5, 7, 9, 2]])
    for name, d in dirs.items():
        with torch.no_grad():
            want = transformers.BertForSequenceClassification.from_pretrained(d)(input_ids=ids).logits
            got = transformers.BertForSequenceClassification.from_pretrained(tmp_path / f"export-{name}")(
                input_ids=ids).logits
        assert torch.equal(got, want)


def test_the_unit_is_one_whole_fine_tune_its_head_included(hf_zoo, tmp_path):
    """The unit, written out: the encoder's bytes plus the mean head (heads of 2, 3 and 5 labels)."""
    base, dirs = hf_zoo
    tasks = flexmerge.load_tasks(base, dirs)
    shared = sum(tasks.meta[k].numel * 4 for k in tasks.mergeable)
    heads = {n: (w * 32 + w) * 4 for n, w in LABELS.items()}
    unit = shared + sum(heads.values()) / 3
    path = flexmerge.plan(tasks)
    assert path.sizes[0] == 3.0
    assert path.min_size == pytest.approx((shared + sum(heads.values())) / unit, rel=1e-12)
    flexmerge.merge_to_disk(tasks, tmp_path / "f", size=2.0)
    r = runner.invoke(app, ["inspect", str(tmp_path / "f")])
    assert r.exit_code == 0 and f"{unit:.0f} bytes" in r.output.replace("\n", " "), r.output
    summary = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "f"), "--json"]).output)
    assert summary["unit_bytes"] == pytest.approx(unit)


def test_size_m_gives_back_causal_lms_with_trained_untied_lm_heads(tmp_path):
    base, dirs = _llama_zoo(tmp_path)
    r = runner.invoke(app, ["merge", "--base", str(base), *_flags(dirs), "--size", "3", "--method", "ties",
                            "--out", str(tmp_path / "f")])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert manifest["size"] == 3.0
    assert "lm_head.weight" in manifest["keys"] and manifest["task_specific_bytes"] == 0  # merged, not its own
    _assert_exports_are_the_fine_tunes(tmp_path / "f", dirs, tmp_path)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        want = transformers.LlamaForCausalLM.from_pretrained(dirs["ft1"])(input_ids=ids).logits
        got = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "export-ft1")(input_ids=ids).logits
    assert torch.equal(got, want)


def test_size_1_with_a_storage_dtype_is_one_fully_merged_model(zoo, tmp_path):
    """fp32 inputs, `dtype: bfloat16` in a config: 1x counts bf16 bytes, so every block is merged."""
    base, models = zoo
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump({
        "base": str(base), "models": {n: str(p) for n, p in models.items()}, "method": "task_arithmetic",
        "params": {"dtype": "bfloat16"}, "size": 1}))
    r = runner.invoke(app, ["merge", "--config", str(tmp_path / "merge.yaml"), "--out", str(tmp_path / "f")])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert manifest["size"] == 1.0 and all(len(b["groups"]) == 1 for b in manifest["blocks"])
    tasks = flexmerge.load_tasks(base, models)
    assert manifest["unit_bytes"] == manifest["stored_bytes"] == tasks.mergeable_bytes() // 2
    r = runner.invoke(app, ["merge", "--config", str(tmp_path / "merge.yaml"), "--size", "max",
                            "--out", str(tmp_path / "mx")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "mx" / "manifest.json").read_text())["size"] == len(models)


def test_a_cut_below_the_asked_size_says_which_point_and_why(zoo, tmp_path):
    base, models = zoo
    r = runner.invoke(app, ["merge", "--base", str(base), *_flags(models), "--size", "2.5", "--out", str(tmp_path / "f")])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    info = manifest["info"]
    note = [line for line in r.output.splitlines() if line.startswith("note:")]
    assert len(note) == 1
    assert f"point {info['path_point']} of {info['path_points'] - 1}" in note[0]
    assert f"{manifest['size']:.4f}x" in note[0] and f"{info['next_size_up']:.4f}x, above 2.5x" in note[0]
    assert manifest["size"] < 2.5 < info["next_size_up"]
    r = runner.invoke(app, ["merge", "--base", str(base), *_flags(models), "--size", "max", "--out", str(tmp_path / "m")])
    assert r.exit_code == 0 and "note:" not in r.output  # exactly what was asked


@pytest.mark.parametrize("size, message", [("big", "'big' is not a number of model units, 'max' or 'min'"),
                                           ("5", "above 4x"), ("0.5", "below the smallest size")])
def test_a_bad_size_is_one_line_and_exit_2(zoo, tmp_path, size, message):
    base, models = zoo
    r = runner.invoke(app, ["merge", "--base", str(base), *_flags(models), "--size", size, "--out", str(tmp_path / "f")])
    assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output
    assert not (tmp_path / "f").exists()
