"""Task-specific parameters (heads, keys the base lacks or has in another shape) and storage budgets:
real Hugging Face fine-tunes with their own classifier heads, merged, exported and reloaded."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import flexmerge
from flexmerge.cli import app
from flexmerge.errors import SizeError
from tests.conftest import HF_LABELS as LABELS

runner = CliRunner()
transformers = pytest.importorskip("transformers")


def _logits(model_dir, ids):
    model = transformers.BertForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 5, 7, 9, 2], [3, 4, 8, 11, 12]])


def test_heads_of_different_sizes_are_task_specific_and_mx_exports_are_exact(hf_zoo, tmp_path):
    base, dirs = hf_zoo
    tasks = flexmerge.load_tasks(base, dirs)
    for name, n in LABELS.items():
        assert set(tasks.specific[name]) == {"classifier.weight", "classifier.bias"}
        assert tasks.specific[name]["classifier.weight"].shape == (n, 32)
    partition = flexmerge.discover_blocks(tasks)
    planned = {p.key for b in partition.blocks for p in b.parts}
    assert not any(k.startswith("classifier") for k in planned)  # heads are never planned or merged
    assert tasks.specific_bytes() == sum((n * 32 + n) * 4 for n in LABELS.values())

    out = tmp_path / "flex"
    manifest = flexmerge.merge_to_disk(tasks, out, max_bytes=10**12)  # everything fits: Mx
    assert manifest["task_specific_bytes"] == tasks.specific_bytes()
    unit = tasks.mergeable_bytes() + tasks.specific_bytes() / len(LABELS)  # one whole fine-tune, mean head
    assert manifest["size"] == (manifest["stored_bytes"] + tasks.specific_bytes()) / unit == len(LABELS)
    flex = flexmerge.load(out)
    for name in LABELS:
        exported = flexmerge.export(flex, name, tmp_path / f"{name}-export")
        config = json.loads((exported / "config.json").read_text())
        assert config["id2label"] == {str(i): f"L{i}" for i in range(LABELS[name])}
        assert torch.equal(_logits(exported, IDS), _logits(dirs[name], IDS))


def test_at_1x_the_shared_encoder_is_task_arithmetic_and_heads_stay_their_own(hf_zoo):
    base, dirs = hf_zoo
    tasks = flexmerge.load_tasks(base, dirs)
    flex = flexmerge.merge(tasks, size="min", method="task_arithmetic", params={"lam": 0.8})
    unit = tasks.mergeable_bytes() + tasks.specific_bytes() / len(LABELS)
    assert flex.size == pytest.approx((tasks.mergeable_bytes() + tasks.specific_bytes()) / unit, rel=1e-12)
    theta0 = load_file(base / "model.safetensors")
    fts = {n: load_file(d / "model.safetensors") for n, d in dirs.items()}
    for name in LABELS:
        sd = flex.state_dict(name)
        for k in ("classifier.weight", "classifier.bias"):
            assert torch.equal(sd[k], fts[name][k])
        for k in tasks.mergeable:
            expected = theta0[k] + 0.8 * torch.stack([ft[k] - theta0[k] for ft in fts.values()]).mean(0)
            torch.testing.assert_close(sd[k], expected, rtol=0, atol=1e-6)


def test_cli_merges_heads_of_2_3_5_labels_and_inspect_reports_them(hf_zoo, tmp_path):
    base, dirs = hf_zoo
    flags = [x for n, d in dirs.items() for x in ("--model", f"{n}={d}")]
    r = runner.invoke(app, ["merge", "--base", str(base), *flags, "--size", "2", "--out", str(tmp_path / "f")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["inspect", str(tmp_path / "f"), "--json"])
    summary = json.loads(r.output)
    assert summary["task_specific_bytes"] == sum((n * 32 + n) * 4 for n in LABELS.values())
    assert summary["task_specific"]["c"] == ["classifier.bias", "classifier.weight"]
    assert summary["size"] <= 2.0


def test_task_specific_pattern_keeps_a_parameter_per_task(zoo, tmp_path):
    base, models = zoo
    tasks = flexmerge.load_tasks(base, models, task_specific=[r"final_norm\..*", r"layers\.2\.norm2\.weight"])
    assert "final_norm.weight" not in tasks.meta and "layers.2.norm2.weight" not in tasks.meta
    flex = flexmerge.merge(tasks, max_bytes=10**9, method="ties")
    for name, path in models.items():
        own = load_file(path)
        for k in ("final_norm.weight", "layers.2.norm2.weight"):
            assert torch.equal(flex.state_dict(name)[k], own[k])
    r = runner.invoke(app, ["merge", "--base", str(base), *[x for n, p in models.items() for x in ("--model", f"{n}={p}")],
                            "--task-specific", "fin(al", "--size", "2", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "not a valid regular expression" in r.output
    r = runner.invoke(app, ["merge", "--base", str(base), *[x for n, p in models.items() for x in ("--model", f"{n}={p}")],
                            "--task-specific", "final_norm", "--size", "2", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and not (tmp_path / "o").exists()
    assert "'final_norm' matches no parameter name" in r.output  # a name's prefix is not the name
    assert r"e.g. 'final_norm\.weight', or 'final_norm.*'" in " ".join(r.output.split())


def test_max_bytes_takes_the_largest_point_that_fits(zoo, tmp_path):
    base, models = zoo
    tasks = flexmerge.load_tasks(base, models)
    path = flexmerge.plan(tasks, method="ties")
    fixed, unit = tasks.frozen_bytes(), tasks.mergeable_bytes()
    budget = int(2.5 * unit) + fixed
    manifest = flexmerge.merge_to_disk(tasks, tmp_path / "o", max_bytes=budget, method="ties")
    on_disk = sum(t.nbytes for f in (tmp_path / "o").glob("shard-*.safetensors") for t in load_file(f).values())
    assert on_disk <= budget
    assert manifest["stored_bytes"] + manifest["frozen_bytes"] == on_disk
    better = [s for s in path.sizes if s * unit + fixed <= budget]
    assert manifest["size"] == pytest.approx(max(better))
    smallest = int(path.min_size * unit) + fixed
    with pytest.raises(SizeError, match=r"smallest artifact .*\(\d+ bytes"):
        flexmerge.merge(tasks, max_bytes=smallest - 10, method="ties")
    r = runner.invoke(app, ["merge", "--base", str(base), *[x for n, p in models.items() for x in ("--model", f"{n}={p}")],
                            "--max-bytes", "1kB", "--out", str(tmp_path / "tiny")])
    assert r.exit_code == 2 and "below the smallest artifact" in r.output


def test_plan_prints_a_size_to_bytes_table(zoo, tmp_path):
    base, models = zoo
    r = runner.invoke(app, ["plan", "--base", str(base), *[x for n, p in models.items() for x in ("--model", f"{n}={p}")],
                            "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    assert "size -> bytes" in r.output and "4.000x" in r.output and "kB" in r.output


def test_a_nan_in_a_task_specific_parameter_is_refused(zoo, tmp_path):
    base, models = zoo
    sd = load_file(models["task1"])
    sd["head.weight"] = torch.tensor([1.0, float("nan")])
    save_file(sd, str(models["task1"]))
    with pytest.raises(flexmerge.errors.CheckpointError, match=r"task1\.safetensors.*'head\.weight'.*NaN"):
        flexmerge.load_tasks(base, models)


def test_an_untied_lm_head_merges_like_any_parameter_unless_marked_task_specific(tmp_path):
    """As in mergekit: a trained untied lm_head is mergeable, an untouched one frozen; classifier
    heads stay their task's own; `--task-specific 'lm_head\\..*'` keeps one per task."""
    cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40, n_positions=16,
                                  tie_word_embeddings=False)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(cfg)
    base.save_pretrained(tmp_path / "base")
    for name, trained_head in (("a", True), ("b", False), ("c", False)):
        sd = {k: v + 0.01 * torch.randn_like(v) if (trained_head or not k.startswith("lm_head")) else v.clone()
              for k, v in base.state_dict().items()}
        ft = transformers.GPT2LMHeadModel(cfg)
        ft.load_state_dict(sd)
        ft.save_pretrained(tmp_path / name)
    models = {n: tmp_path / n for n in "abc"}
    tasks = flexmerge.load_tasks(tmp_path / "base", models)
    assert "lm_head.weight" in tasks.mergeable and not any(tasks.specific.values())
    theta0 = load_file(tmp_path / "base" / "model.safetensors")["lm_head.weight"]
    heads = [load_file(d / "model.safetensors")["lm_head.weight"] for d in models.values()]
    flex = flexmerge.merge(tasks, size=1, method="task_arithmetic", params={"lam": 0.8})
    merged = theta0 + 0.8 * torch.stack([h - theta0 for h in heads]).mean(0)
    for name in "abc":
        torch.testing.assert_close(flex.state_dict(name)["lm_head.weight"], merged, rtol=0, atol=1e-6)
    untrained = flexmerge.load_tasks(tmp_path / "base", {n: tmp_path / n for n in "bc"})
    assert "lm_head.weight" in untrained.frozen  # no task trained it: stored once
    own = flexmerge.load_tasks(tmp_path / "base", models, task_specific=[r"lm_head\..*"])
    assert "lm_head.weight" not in own.meta and all("lm_head.weight" in own.specific[n] for n in "abc")
    flex = flexmerge.merge(own, size="min")
    for name, head in zip("abc", heads):
        assert torch.equal(flex.state_dict(name)["lm_head.weight"], head)


def test_tensors_kept_only_because_the_base_differs_are_named_in_one_note(zoo, tmp_path):
    """A fine-tune with a tensor the base lacks and one of another shape merges, keeping both as its
    own; a wrong base model looks the same, so the CLI says so in one line naming them. A
    --task-specific pattern that declares them silences it."""
    base, models = zoo
    sd = load_file(models["task1"])
    sd["extra.weight"] = torch.ones(3)
    sd["layers.0.norm1.weight"] = torch.ones(7)
    save_file(sd, str(models["task1"]))
    args = ["merge", "--base", str(base), *(f"--model={t}={p}" for t, p in models.items()), "--size", "max"]
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    line = " ".join(r.output.split())
    assert "note: kept as each task's own, never merged, because the base lacks them or shapes them otherwise: " \
           "task0: layers.0.norm1.weight; task1: extra.weight, layers.0.norm1.weight;" in line  # one shape: every task's
    with pytest.warns(flexmerge.errors.FlexMergeWarning, match="task1: extra.weight, layers.0.norm1.weight"):
        flexmerge.load_tasks(base, models)
    r = runner.invoke(app, [*args, "--task-specific", r"extra\..*", "--task-specific", r"layers\.0\.norm1\..*",
                            "--out", str(tmp_path / "b")])
    assert r.exit_code == 0 and "note:" not in r.output, r.output
