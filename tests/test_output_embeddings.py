"""Output embeddings merge like any parameter (as in mergekit): three full fine-tunes of a tiny
Llama merge to 1x, every tensor (lm_head included) the method's formula written out here; Mx
gives each fine-tune's logits back; tied embeddings stay tied in every export; fine-tunes that
added tokens merge the base's rows, keep the added rows as their own and export their tokenizer;
under `tokenizer_source: base` their added rows are dropped (as mergekit builds every model over
the base's vocabulary), so 1x is one model with the base's tokenizer."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import flexmerge
from flexmerge.cli import app
from flexmerge.errors import CheckpointError, ConfigError
from flexmerge.taskvec import Chunk, as_taskset, spec_of
from tests.conftest import word_tokenizer

transformers = pytest.importorskip("transformers")
runner = CliRunner()
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
VOCAB = 64
IDS = torch.tensor([[1, 5, 9, 33, 63, 2]])


def _config(tied: bool, vocab: int = VOCAB):
    return transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64,
                                    tie_word_embeddings=tied)


def _tokenizer(added: int = 0):
    """A word-level tokenizer of VOCAB entries, plus `added` new tokens (ids VOCAB, VOCAB+1, ...)."""
    tok = word_tokenizer([f"w{i}" for i in range(VOCAB - 5)])
    tok.add_tokens([f"<new{i}>" for i in range(added)])
    return tok


def _zoo(root, tied: bool = False, added: tuple[int, ...] = (0, 0, 0), tokenizers: bool = True):
    """A base LlamaForCausalLM and three full fine-tunes (every parameter perturbed, lm_head too);
    fine-tune i first grows its vocabulary by added[i] tokens (`resize_token_embeddings`)."""
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(_config(tied)).eval()
    base.save_pretrained(root / "base")
    if tokenizers:
        _tokenizer().save_pretrained(root / "base")
    dirs = {}
    for i, extra in enumerate(added):
        ft = transformers.LlamaForCausalLM(_config(tied)).eval()
        ft.load_state_dict(base.state_dict())
        if extra:
            ft.resize_token_embeddings(VOCAB + extra)
        torch.manual_seed(20 + i)
        with torch.no_grad():
            for p in ft.parameters():  # tied parameters once: they stay tied
                p.add_(0.01 * torch.randn_like(p))
        dirs[f"ft{i}"] = root / f"ft{i}"
        ft.save_pretrained(dirs[f"ft{i}"])
        if tokenizers:
            _tokenizer(extra).save_pretrained(dirs[f"ft{i}"])
    return root / "base", dirs


def _flags(dirs) -> list[str]:
    return [x for name, d in dirs.items() for x in ("--model", f"{name}={d}")]


def _logits(model_dir, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return transformers.LlamaForCausalLM.from_pretrained(model_dir).eval()(input_ids=ids).logits


def _weights(model_dir) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def _ta(theta0, fts, lam=1.5):
    """Task arithmetic with flexmerge's defaults: θ0 + λ · mean of the task vectors (λ = 1.5)."""
    return {k: theta0[k] + lam * torch.stack([ft[k] - theta0[k] for ft in fts]).mean(0) for k in theta0}


def _ties(theta0, fts, keep=0.2, lam=1.0):
    """TIES with flexmerge's defaults, written out: each task vector trimmed over the whole model to
    |τ| >= its (int(D·keep)+1)-th largest magnitude, the sign of the summed trimmed vectors elected
    per entry (a zero sum elects +), the mean of the entries that agree with it (none: 0), × λ."""
    keys = list(theta0)
    flat = torch.stack([torch.cat([(ft[k] - theta0[k]).flatten() for k in keys]) for ft in fts])
    k = int(flat.shape[1] * keep)
    threshold = flat.abs().sort(dim=1, descending=True).values[:, k:k + 1]
    trimmed = torch.where(flat.abs() >= threshold, flat, torch.zeros(()))
    sign = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    agree = (trimmed * sign) > 0
    merged = lam * (trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)
    out, at = {}, 0
    for key in keys:
        n = theta0[key].numel()
        out[key] = theta0[key] + merged[at:at + n].view_as(theta0[key])
        at += n
    return out


@pytest.mark.parametrize("method, formula", [("task_arithmetic", _ta), ("ties", _ties)])
def test_three_full_llama_fine_tunes_merge_to_1x_lm_head_included(tmp_path, method, formula):
    base, dirs = _zoo(tmp_path)
    r = runner.invoke(app, ["merge", "--base", str(base), *_flags(dirs), "--method", method, "--size", "1",
                            "--out", str(tmp_path / "f")])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert manifest["size"] == 1.0 and manifest["task_specific_bytes"] == 0 and manifest["frozen_bytes"] == 0
    assert HEAD in manifest["keys"] and all(len(b["groups"]) == 1 for b in manifest["blocks"])
    theta0, fts = _weights(base), [_weights(d) for d in dirs.values()]
    assert HEAD in theta0 and all(not torch.equal(ft[k], theta0[k]) for ft in fts for k in theta0)  # all trained
    want = formula(theta0, fts)
    flex = flexmerge.load(tmp_path / "f")
    for name in dirs:
        got = _weights(flexmerge.export(flex, name, tmp_path / f"export-{name}"))
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=2e-6, msg=f"{name} {k}")


def test_the_untied_llama_unit_is_every_parameter_and_the_smallest_size_is_1x(tmp_path):
    base, dirs = _zoo(tmp_path)
    tasks = flexmerge.load_tasks(base, dirs)
    assert HEAD in tasks.mergeable and tasks.specific == {n: {} for n in dirs}
    assert tasks.mergeable_bytes() == sum(t.nbytes for t in _weights(base).values())
    path = flexmerge.plan(tasks, method="average")
    assert path.min_size == 1.0 and path.sizes[0] == 3.0


def test_at_mx_every_export_gives_its_fine_tunes_logits(tmp_path):
    base, dirs = _zoo(tmp_path)
    r = runner.invoke(app, ["merge", "--base", str(base), *_flags(dirs), "--method", "ties", "--size", "max",
                            "--out", str(tmp_path / "f")])
    assert r.exit_code == 0, r.output
    flex = flexmerge.load(tmp_path / "f")
    for name, d in dirs.items():
        exported = flexmerge.export(flex, name, tmp_path / f"export-{name}")
        assert torch.equal(_logits(exported), _logits(d))


def test_task_specific_lm_head_keeps_the_old_rule(tmp_path):
    """`--task-specific 'lm_head\\..*'`: each task keeps its own lm_head; the rest merges."""
    base, dirs = _zoo(tmp_path)
    r = runner.invoke(app, ["merge", "--base", str(base), *_flags(dirs), "--task-specific", r"lm_head\..*",
                            "--size", "min", "--out", str(tmp_path / "f")])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert HEAD not in manifest["keys"] and manifest["task_specific_bytes"] == 3 * VOCAB * 32 * 4
    assert manifest["size"] > 1.0
    flex = flexmerge.load(tmp_path / "f")
    for name, d in dirs.items():
        assert torch.equal(flex.state_dict(name)[HEAD], _weights(d)[HEAD])


def _both_keys(model_dir) -> None:
    """Rewrite a tied model's weights as a plain state dict holds them: lm_head beside embed_tokens."""
    sd = _weights(model_dir)
    sd[HEAD] = sd[EMBED].clone()
    save_file(sd, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("stored", ["embeddings only", "both keys"])
def test_tied_embeddings_stay_tied_in_every_export(tmp_path, stored):
    base, dirs = _zoo(tmp_path, tied=True)
    if stored == "both keys":
        for d in [base, *dirs.values()]:
            _both_keys(d)
    tasks = flexmerge.load_tasks(base, dirs)
    assert HEAD not in tasks.meta and EMBED in tasks.mergeable and not any(tasks.specific.values())
    assert flexmerge.plan(tasks, method="average").min_size == 1.0
    for size in ("1", "max"):
        out = tmp_path / f"f{size}"
        r = runner.invoke(app, ["merge", "--base", str(base), *_flags(dirs), "--size", size, "--out", str(out)])
        assert r.exit_code == 0, r.output
        flex = flexmerge.load(out)
        for name, d in dirs.items():
            exported = flexmerge.export(flex, name, tmp_path / f"export-{size}-{name}")
            assert HEAD not in _weights(exported)  # as save_pretrained writes a tied model
            model = transformers.LlamaForCausalLM.from_pretrained(exported)
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
            if size == "max":
                assert torch.equal(_logits(exported), _logits(d))


def test_a_tied_copy_with_values_of_its_own_merges_as_a_parameter(tmp_path):
    """A checkpoint whose lm_head is not its embeddings (transformers unties such a model too)."""
    base, dirs = _zoo(tmp_path, tied=True)
    for d in [base, *dirs.values()]:
        _both_keys(d)
    sd = _weights(dirs["ft1"])
    sd[HEAD] = sd[HEAD] + 0.01
    save_file(sd, str(dirs["ft1"] / "model.safetensors"), metadata={"format": "pt"})
    tasks = flexmerge.load_tasks(base, dirs)
    assert HEAD in tasks.mergeable


@pytest.mark.parametrize("tied", [False, True])
def test_added_tokens_merge_the_base_rows_and_keep_their_own(tmp_path, tied):
    base, dirs = _zoo(tmp_path, tied=tied, added=(4, 0, 2))
    tasks = flexmerge.load_tasks(base, dirs)
    grown = [EMBED] if tied else [EMBED, HEAD]
    for k in grown:
        assert tasks.meta[k].shape == (VOCAB, 32) and k in tasks.mergeable
        assert tasks.specific["ft0"][k].shape == (4, 32) and tasks.specific["ft2"][k].shape == (2, 32)
    assert tasks.specific["ft1"] == {}
    assert tasks.specific_bytes() == len(grown) * 6 * 32 * 4
    assert as_taskset(spec_of(tasks)).read_task(0, Chunk(EMBED, None)).shape == (VOCAB, 32)  # a worker's view

    theta0, fts = _weights(base), {n: _weights(d) for n, d in dirs.items()}
    r = runner.invoke(app, ["merge", "--base", str(base), *_flags(dirs), "--method", "task_arithmetic",
                            "--size", "min", "--out", str(tmp_path / "f1")])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "f1" / "manifest.json").read_text())
    unit = tasks.mergeable_bytes() + tasks.specific_bytes() / 3
    assert manifest["size"] == pytest.approx((tasks.mergeable_bytes() + tasks.specific_bytes()) / unit, rel=1e-12)
    assert manifest["task_specific"]["ft0"][EMBED]["shape"] == [4, 32]
    r = runner.invoke(app, ["inspect", str(tmp_path / "f1")])
    assert "ft0 keeps its own: " in r.output and f"{EMBED} (4 added rows)" in r.output, r.output
    summary = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "f1"), "--json"]).output)
    assert summary["added_rows"] == {"ft0": {k: 4 for k in grown}, "ft2": {k: 2 for k in grown}}
    shared = _ta(theta0, [{k: v[:VOCAB] if k in grown else v for k, v in ft.items()} for ft in fts.values()])
    flex = flexmerge.load(tmp_path / "f1")
    for name, extra in zip(dirs, (4, 0, 2)):
        exported = flexmerge.export(flex, name, tmp_path / f"export1-{name}")
        got = _weights(exported)
        for k in shared:
            torch.testing.assert_close(got[k][:VOCAB], shared[k], rtol=0, atol=2e-6)
        for k in grown:
            assert got[k].shape == (VOCAB + extra, 32) and torch.equal(got[k][VOCAB:], fts[name][k][VOCAB:])
        assert len(transformers.AutoTokenizer.from_pretrained(exported)) == VOCAB + extra
        assert _logits(exported).shape[-1] == VOCAB + extra

    r = runner.invoke(app, ["merge", "--base", str(base), *_flags(dirs), "--size", "max",
                            "--out", str(tmp_path / "fm")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "fm" / "manifest.json").read_text())["size"] == 3.0
    flex = flexmerge.load(tmp_path / "fm")
    for name, d in dirs.items():
        exported = flexmerge.export(flex, name, tmp_path / f"exportm-{name}")
        assert _weights(exported).keys() == fts[name].keys()
        assert all(torch.equal(_weights(exported)[k], fts[name][k]) for k in fts[name])
        ids = torch.tensor([[1, 5, 9, VOCAB - 1, VOCAB + 1, VOCAB]]) if name != "ft1" else IDS
        assert torch.equal(_logits(exported, ids), _logits(d, ids))
        if tied:
            model = transformers.LlamaForCausalLM.from_pretrained(exported)
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_added_tokens_without_the_fine_tunes_tokenizer_are_refused(tmp_path):
    base, dirs = _zoo(tmp_path, added=(4, 0, 0))
    for f in dirs["ft0"].iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    with pytest.raises(CheckpointError, match=r"task 'ft0' .* adds 4 rows to '(lm_head|model\.embed_tokens)\.weight' "
                                              r"\(the base has 64, it has 68\) but has no tokenizer files"):
        flexmerge.load_tasks(base, dirs)
    r = runner.invoke(app, ["merge", "--base", str(base), *_flags(dirs), "--size", "1", "--out", str(tmp_path / "f")])
    assert r.exit_code == 2 and "save them beside its weights" in " ".join(r.output.split()), r.output


def test_plain_files_with_added_rows_merge_without_side_files(tmp_path):
    """Plain checkpoint files carry no tokenizer: nothing to refuse."""
    base, dirs = _zoo(tmp_path, added=(3, 0, 0), tokenizers=False)
    files = {n: shutil.copy(d / "model.safetensors", tmp_path / f"{n}.safetensors") for n, d in dirs.items()}
    tasks = flexmerge.load_tasks(base / "model.safetensors", files)
    flex = flexmerge.merge(tasks, size="max")
    assert torch.equal(flex.state_dict("ft0")[EMBED], _weights(dirs["ft0"])[EMBED])


def test_a_manifest_whose_added_rows_do_not_fit_their_key_is_refused(tmp_path):
    base, dirs = _zoo(tmp_path, added=(4, 0, 0))
    flexmerge.merge_to_disk(flexmerge.load_tasks(base, dirs), tmp_path / "f", size="max")
    path = tmp_path / "f" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["task_specific"]["ft0"][EMBED]["shape"] = [4, 31]
    path.write_text(json.dumps(manifest))
    with pytest.raises(Exception, match=r"task-specific rows of 'model\.embed_tokens\.weight'"):
        flexmerge.load(tmp_path / "f")


def _mergekit_base_vocabulary(root, base, dirs):
    """mergekit's task_arithmetic (weight 0.5 each, λ 1) over the base's tokenizer."""
    models = "".join(f"  - model: {d}\n    parameters: {{weight: 0.5}}\n" for d in dirs.values())
    (root / "mk.yml").write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n{models}"
                                 "tokenizer_source: base\n")
    return root / "mk.yml"


@pytest.mark.parametrize("tied", [False, True])
def test_tokenizer_source_base_drops_added_rows_and_merges_to_1x_over_the_base_vocabulary(tmp_path, tied):
    """mergekit builds every model's embeddings over the base's vocabulary (row of each base token,
    the same id in every model here), then merges: θ0 + Σ 0.5 · τ_i on the base's rows."""
    base, dirs = _zoo(tmp_path, tied=tied, added=(2, 0))
    assert _weights(dirs["ft0"])[EMBED].shape == (VOCAB + 2, 32)
    r = runner.invoke(app, ["merge", "--config", str(_mergekit_base_vocabulary(tmp_path, base, dirs)),
                            "--size", "1", "--out", str(tmp_path / "f")])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert manifest["size"] == 1.0 and manifest["task_specific_bytes"] == 0
    assert manifest["info"]["vocabulary"] == "base" and not manifest.get("task_specific")
    theta0 = _weights(base)
    fts = [{k: v[:VOCAB] for k, v in _weights(d).items()} for d in dirs.values()]  # the base's token ids' rows
    want = {k: theta0[k] + sum(0.5 * (ft[k] - theta0[k]) for ft in fts) for k in theta0}
    base_tokenizer = (base / "tokenizer.json").read_text()
    for name in dirs:
        exported = tmp_path / f"export-{name}"
        assert runner.invoke(app, ["export", str(tmp_path / "f"), "--task", name, "--out", str(exported)]
                             ).exit_code == 0
        got = _weights(exported)
        assert got.keys() == want.keys() and got[EMBED].shape == (VOCAB, 32)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=2e-6, msg=f"{name} {k}")
        assert (exported / "tokenizer.json").read_text() == base_tokenizer
        assert json.loads((exported / "config.json").read_text())["vocab_size"] == VOCAB
        assert len(transformers.AutoTokenizer.from_pretrained(exported)) == VOCAB
        assert _logits(exported).shape[-1] == VOCAB  # transformers loads it as the base's vocabulary


def test_tokenizer_source_base_refuses_a_tokenizer_that_numbers_the_base_tokens_otherwise(tmp_path):
    base, dirs = _zoo(tmp_path, added=(2, 0))
    words = [f"w{i}" for i in range(VOCAB - 5)]
    word_tokenizer([words[1], words[0], *words[2:]]).save_pretrained(dirs["ft1"])  # w0 and w1 swap ids
    r = runner.invoke(app, ["merge", "--config", str(_mergekit_base_vocabulary(tmp_path, base, dirs)),
                            "--size", "1", "--out", str(tmp_path / "f")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    line = " ".join(r.output.split())
    assert "task 'ft1'" in line and "the base gives 'w0' id 5, the task's tokenizer gives it id 6" in line, line
    assert "use mergekit-yaml" in line and not (tmp_path / "f").exists()


def test_the_api_loads_over_the_base_vocabulary_and_refuses_the_base_tokenizer_with_added_rows(tmp_path):
    base, dirs = _zoo(tmp_path, added=(2, 0))
    tasks = flexmerge.load_tasks(base, dirs, vocabulary="base")
    assert tasks.specific == {n: {} for n in dirs} and tasks.meta[EMBED].shape == (VOCAB, 32)
    assert as_taskset(spec_of(tasks)).read_task(0, Chunk(EMBED, None)).shape == (VOCAB, 32)  # a worker's view
    assert flexmerge.plan(tasks, method="average").min_size == 1.0
    flex = flexmerge.merge(tasks, size=1, method="average")  # the base's tokenizer by default, as loaded
    assert flex.hf_files["ft0"]["tokenizer.json"] == (base / "tokenizer.json").read_bytes()
    with pytest.raises(ConfigError, match="exports carry the base's tokenizer; give tokenizer_source='base'"):
        flexmerge.merge(tasks, size=1, method="average", tokenizer_source="tasks")
    with pytest.raises(ConfigError, match=r"task 'ft0' keeps rows it added to .*load the tasks with vocabulary='base'"):
        flexmerge.merge(flexmerge.load_tasks(base, dirs), size="max", tokenizer_source="base")
    with pytest.raises(ConfigError, match="vocabulary must be one of tasks, base"):
        flexmerge.load_tasks(base, dirs, vocabulary="union")


def test_tokenizer_source_base_refuses_an_unreadable_tokenizer_in_one_error(tmp_path):
    base, dirs = _zoo(tmp_path, added=(2, 0))
    (dirs["ft1"] / "tokenizer.json").write_text('{"model": {"vocab": 7}')
    with pytest.raises(CheckpointError, match=r"task 'ft1' .*: tokenizer\.json is not a readable tokenizer"):
        flexmerge.load_tasks(base, dirs, vocabulary="base")
    flexmerge.load_tasks(base, dirs)  # each task's own tokenizer: its ids are not compared
