"""`flexmerge export --format peft`: a shared base and one PEFT LoRA adapter per task, loaded by
peft's own loaders (`PeftModel.from_pretrained`, `load_adapter`) and run per task and as one mixed
batch (`adapter_names`) on tiny Llama models and a BERT classifier. At full rank every adapter
gives its task's exported logits; truncated, it reports the truncated SVD's error, computed here;
Twin-Merging residuals keep their stored rank exactly."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import flexmerge
from flexmerge.cli import app
from flexmerge.io.open import open_checkpoint
from tests.conftest import bert_config
from tests.test_output_embeddings import _flags, _zoo

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
runner = CliRunner()
IDS = torch.tensor([[1, 5, 9, 33, 63, 2], [3, 4, 5, 6, 7, 8]])
TASKS = ["ft0", "ft1", "ft2"]
ATOL = 1e-5  # fp32 SVD factors against the export's weights: the observed logits gap is ~3e-7


def _cli(*argv: str) -> str:
    r = runner.invoke(app, [str(a) for a in argv])
    assert r.exit_code == 0, r.output
    return r.output


def _merge(base, dirs, out, *method) -> None:
    _cli("merge", "--base", base, *_flags(dirs), *method, "--out", out)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama base, three full fine-tunes, and artifacts of them: TIES at 2.5x (blocks shared
    by two tasks and blocks kept per task), Twin-Merging at rank 3 (every block one group), and TIES
    at 2x of fine-tunes with tied embeddings."""
    root = tmp_path_factory.mktemp("llama")
    base, dirs = _zoo(root / "zoo")
    _merge(base, dirs, root / "ties", "--method", "ties", "--size", "2.5")
    _merge(base, dirs, root / "twin", "--method", "twin", "--param", "rank=3", "--size", "min")
    tied_base, tied_dirs = _zoo(root / "tied-zoo", tied=True)
    _merge(tied_base, tied_dirs, root / "tied", "--method", "ties", "--size", "2")
    return root


def _peft_model(out, tasks, cls=None):
    """Base + every adapter through peft's own loaders; none may leave a key of its file unused."""
    cls = cls or transformers.LlamaForCausalLM
    model = peft.PeftModel.from_pretrained(cls.from_pretrained(out / "base"), out / "adapters" / tasks[0],
                                           adapter_name=tasks[0])
    for t in tasks[1:]:
        result = model.load_adapter(out / "adapters" / t, adapter_name=t)
        assert not result.unexpected_keys, result.unexpected_keys
    return model.eval()


def _exported(artifact, task, root, cls=None):
    """The task's model as flexmerge's own export writes it (`flexmerge export ARTIFACT --task`)."""
    out = root / f"export-{artifact.name}-{task}"
    if not out.exists():
        _cli("export", artifact, "--task", task, "--out", out)
    return (cls or transformers.LlamaForCausalLM).from_pretrained(out).eval()


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ranks(adapter_dir) -> dict[str, int]:
    """Module -> the rank of its LoRA factors in adapter_model.safetensors."""
    out = {}
    for k, v in load_file(adapter_dir / "adapter_model.safetensors").items():
        if k.endswith((".lora_A.weight", ".lora_embedding_A")):
            out[k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]] = v.shape[0]
    return out


def _reported_errors(output: str) -> dict[str, float]:
    return {m[1]: float(m[2]) for m in re.finditer(r"^(\w+): .*relative error ([0-9.e+-]+)", output, re.M)}


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")  # peft: LoRA on a tied lm_head
@pytest.mark.parametrize("artifact", ["ties", "tied"])
def test_full_rank_adapters_give_each_tasks_exported_logits(llama, tmp_path, artifact):
    out = tmp_path / "peft"
    output = _cli("export", llama / artifact, "--format", "peft", "--out", out)
    assert set(_reported_errors(output)) == set(TASKS) and max(_reported_errors(output).values()) < 1e-5
    model = _peft_model(out, TASKS)
    for t in TASKS:
        written = set(load_file(out / "adapters" / t / "adapter_model.safetensors"))
        ours = set(peft.get_peft_model_state_dict(model, adapter_name=t, save_embedding_layers=False))
        assert written == ours  # peft's own key names for what it loaded
        model.set_adapter(t)
        torch.testing.assert_close(_logits(model), _logits(_exported(llama / artifact, t, tmp_path)),
                                   rtol=0, atol=ATOL)
    config = json.loads((out / "adapters" / TASKS[0] / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None and not config["lora_bias"]  # norms folded: plain LoRA, as vLLM takes
    assert config["lora_alpha"] == config["r"] == max(_ranks(out / "adapters" / TASKS[0]).values())


def test_the_base_is_the_shared_weights_where_tasks_share_them_else_their_mean(llama, tmp_path):
    out = tmp_path / "peft"
    _cli("export", llama / "ties", "--format", "peft", "--out", out)
    base = load_file(out / "base" / "model.safetensors")
    exports = [{k: v for k, v in _exported(llama / "ties", t, tmp_path).state_dict().items()} for t in TASKS]
    shared = mean = 0
    for key, value in base.items():
        values = [e[key] for e in exports]
        groups = [[j for j in range(3) if torch.equal(values[i], values[j])] for i in range(3)]
        largest = max(groups, key=len)
        if len(largest) > 1:  # the weights two or three tasks read: the base's
            assert torch.equal(value, values[largest[0]]), key
            shared += 1
        else:
            torch.testing.assert_close(value, torch.stack(values).mean(0), rtol=0, atol=1e-7)
            mean += 1
    assert shared and mean  # the 2.5x artifact has both kinds of blocks
    card = (out / "base" / "README.md").read_text()
    assert "largest group" in card and "mean of the tasks' weights" in card


def test_one_mixed_batch_equals_per_task_runs_forward_and_generate(llama, tmp_path):
    out = tmp_path / "peft"
    _cli("export", llama / "ties", "--format", "peft", "--out", out)
    model = _peft_model(out, TASKS)
    names = ["ft2", "ft0", "ft1", "ft0"]
    ids = IDS[[0, 1, 0, 1]]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        generated = model.generate(input_ids=ids, adapter_names=names, max_new_tokens=6, do_sample=False,
                                   pad_token_id=0)
    for row, t in enumerate(names):
        exported = _exported(llama / "ties", t, tmp_path)
        with torch.no_grad():
            torch.testing.assert_close(mixed[row], exported(input_ids=ids[row:row + 1]).logits[0], rtol=0, atol=ATOL)
            alone = exported.generate(input_ids=ids[row:row + 1], max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert generated[row].tolist() == alone[0].tolist()


def _deltas(out, artifact, tmp_path, task) -> dict[str, torch.Tensor]:
    """Per LoRA module of the task's adapter, its weight in the task's export minus the base's."""
    base = load_file(out / "base" / "model.safetensors")
    own = _exported(artifact, task, tmp_path).state_dict()
    return {m: own[f"{m}.weight"].float() - base[f"{m}.weight"].float() for m in _ranks(out / "adapters" / task)}


def test_truncated_ranks_report_the_truncated_svds_error_which_falls_with_the_rank(llama, tmp_path):
    errors = {}
    for rank in (1, 4, 16):
        out = tmp_path / f"r{rank}"
        output = _cli("export", llama / "ties", "--format", "peft", "--norms", "save", "--rank", rank, "--out", out)
        errors[rank] = _reported_errors(output)
        for t in TASKS:
            deltas = _deltas(out, llama / "ties", tmp_path, t)
            lost = total = 0.0
            for m, delta in deltas.items():
                s = torch.linalg.svdvals(delta)
                assert _ranks(out / "adapters" / t)[m] == min(rank, len(s))
                lost += float(s[rank:].square().sum())  # Eckart-Young: what the rank-r SVD leaves out
                total += float(s.square().sum())
            expected = math.sqrt(lost / total)
            assert errors[rank][t] == pytest.approx(expected, rel=2e-3)
            readme = (out / "adapters" / t / "README.md").read_text()
            written = float(re.search(r"^\| relative error \| ([0-9.e+-]+) ", readme, re.M)[1])
            assert written == pytest.approx(expected, rel=2e-3) and f"| rank rule | rank <= {rank} |" in readme
    for t in TASKS:
        assert errors[1][t] > errors[4][t] > errors[16][t] > 0


def test_energy_keeps_the_fewest_directions_holding_that_energy(llama, tmp_path):
    out = tmp_path / "e"
    _cli("export", llama / "ties", "--format", "peft", "--norms", "save", "--energy", "0.8", "--out", out)
    for t in TASKS:
        for m, delta in _deltas(out, llama / "ties", tmp_path, t).items():
            e = torch.linalg.svdvals(delta).double().square()
            want = next(k for k in range(1, len(e) + 1) if e[:k].sum() >= 0.8 * e.sum())
            assert _ranks(out / "adapters" / t)[m] == want, m


def test_twin_residuals_export_exactly_at_their_stored_rank(llama, tmp_path):
    flex = flexmerge.load(llama / "twin")
    matrices = [s for b, s in zip(flex.partition.blocks, flex.blocks) if len(flex.meta[b.parts[0].key].shape) == 2]
    assert all(len(s.groups) == 1 for s in matrices)  # every block of 2-D weights: one shared vector + residuals
    out = tmp_path / "saved"
    output = _cli("export", llama / "twin", "--format", "peft", "--norms", "save", "--out", out)
    assert max(_reported_errors(output).values()) < 1e-6
    keys = {part.key: (b, p) for b, block in enumerate(flex.partition.blocks) for p, part in enumerate(block.parts)}
    for i, t in enumerate(TASKS):
        adapter = load_file(out / "adapters" / t / "adapter_model.safetensors")
        ranks = _ranks(out / "adapters" / t)
        assert set(ranks.values()) == {3} and len(ranks) == 16  # 2 x 7 Linear layers, lm_head, the embedding
        for m in ranks:
            b, p = keys[f"{m}.weight"]
            a, f = flex.blocks[b].groups[0].residuals[i][p]
            pre = f"base_model.model.{m}"
            product = (adapter[f"{pre}.lora_embedding_A"].T @ adapter[f"{pre}.lora_embedding_B"].T
                       if "embed" in m else adapter[f"{pre}.lora_B.weight"] @ adapter[f"{pre}.lora_A.weight"])
            torch.testing.assert_close(product, a @ f, rtol=0, atol=1e-6)
    _cli("export", llama / "twin", "--format", "peft", "--out", tmp_path / "folded")
    saved, folded = _peft_model(out, TASKS), _peft_model(tmp_path / "folded", TASKS)
    for t in TASKS:
        want = _logits(_exported(llama / "twin", t, tmp_path))
        for model in (saved, folded):
            model.set_adapter(t)
            torch.testing.assert_close(_logits(model), want, rtol=0, atol=ATOL)
    with torch.no_grad():  # folded norms leave plain LoRA: one mixed batch
        mixed = folded(input_ids=IDS[[0, 0, 1]], adapter_names=TASKS).logits
    folded.set_adapter("ft1")
    torch.testing.assert_close(mixed[1], _logits(folded)[0], rtol=0, atol=ATOL)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """Three fine-tunes of a BERT classifier (2 labels; every weight perturbed, heads included),
    merged with TIES at 2x."""
    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(bert_config(2)).eval()
    base.save_pretrained(root / "base")
    dirs = {}
    for i, name in enumerate(TASKS):
        torch.manual_seed(10 + i)
        ft = transformers.BertForSequenceClassification(bert_config(2)).eval()
        ft.load_state_dict({k: v + 0.02 * torch.randn_like(v) for k, v in base.state_dict().items()})
        ft.save_pretrained(root / name)
        dirs[name] = root / name
    _merge(root / "base", dirs, root / "ties", "--method", "ties", "--size", "2")
    return root


def test_a_bert_classifier_keeps_its_head_norms_and_biases_and_reads_back(bert, tmp_path):
    out = tmp_path / "peft"
    output = _cli("export", bert / "ties", "--format", "peft", "--out", out)
    assert "post-norm residual stream" in output and "cannot run these adapters in one mixed batch" in output
    cls = transformers.BertForSequenceClassification
    model = _peft_model(out, TASKS, cls)
    assert isinstance(model, peft.PeftModelForSequenceClassification)
    for t in TASKS:
        config = json.loads((out / "adapters" / t / "adapter_config.json").read_text())
        assert config["task_type"] == "SEQ_CLS" and "classifier" in config["modules_to_save"]
        model.set_adapter(t)
        exported = _exported(bert / "ties", t, tmp_path, cls)
        torch.testing.assert_close(_logits(model, IDS % 60), _logits(exported, IDS % 60), rtol=0, atol=ATOL)
        # flexmerge's own reader of PEFT adapters gives the same weights back
        source = open_checkpoint(out / "adapters" / t, base=out / "base")
        for key, value in exported.state_dict().items():
            if key in source.keys():
                torch.testing.assert_close(source.read(key), value, rtol=0, atol=1e-6)
    biased = [t for t in TASKS if json.loads((out / "adapters" / t / "adapter_config.json").read_text())["lora_bias"]]
    assert biased  # Linear biases ride on lora_B.bias
    saved = {m for t in TASKS for m in json.loads((out / "adapters" / t / "adapter_config.json").read_text())
             ["modules_to_save"]}
    assert any(m.endswith("LayerNorm") for m in saved)


def test_heads_of_different_widths_and_plain_files_are_refused_in_one_line(hf_zoo, zoo, tmp_path):
    base, dirs = hf_zoo  # classifiers of 2, 3 and 5 labels
    _cli("merge", "--base", base, *[x for n, d in dirs.items() for x in ("--model", f"{n}={d}")], "--size", "3",
         "--out", tmp_path / "heads")
    plain_base, plain = zoo
    _cli("merge", "--base", plain_base, *[x for n, p in plain.items() for x in ("--model", f"{n}={p}")],
         "--size", "2", "--out", tmp_path / "plain")
    for artifact, message in (("heads", "differ in shape"), ("plain", "holds no Hugging Face config")):
        r = runner.invoke(app, ["export", str(tmp_path / artifact), "--format", "peft", "--out", str(tmp_path / "x")])
        assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
        assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv, message", [
    (["--format", "peft", "--rank", "0"], "rank must be a positive integer"),
    (["--format", "peft", "--energy", "1.5"], "energy must be a fraction in (0, 1]"),
    (["--format", "peft", "--energy", "0"], "energy must be a fraction in (0, 1]"),
    (["--format", "peft", "--rank", "4", "--energy", "0.9"], "not both"),
    (["--format", "peft", "--norms", "drop"], "norms must be one of fold, save"),
    (["--format", "peft", "--task", "ft0"], "--task is for --format full"),
    (["--format", "peft", "--out-dtype", "float16"], "--out-dtype is an option of --format full"),
    (["--task", "ft0", "--rank", "4"], "--rank is an option of --format peft"),
    ([], "--task is required"),
    (["--format", "gguf"], "unknown export format 'gguf'"),
])
def test_bad_options_are_one_line_errors(llama, tmp_path, argv, message):
    r = runner.invoke(app, ["export", str(llama / "ties"), "--out", str(tmp_path / "x"), *argv])
    assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "x").exists()


def test_overwrite_replaces_only_a_peft_export_and_a_failed_export_leaves_nothing(llama, tmp_path, monkeypatch):
    out = tmp_path / "peft"
    _cli("export", llama / "ties", "--format", "peft", "--rank", "2", "--max-shard-size", "20kB", "--out", out)
    assert len(json.loads((out / "base" / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    r = runner.invoke(app, ["export", str(llama / "ties"), "--format", "peft", "--out", str(out)])
    assert r.exit_code == 2 and "already exists" in r.output
    _cli("export", llama / "ties", "--format", "peft", "--rank", "4", "--out", out, "--overwrite")
    assert max(_ranks(out / "adapters" / "ft0").values()) == 4  # the sharded base replaced by one file
    assert sorted(p.name for p in (out / "base").glob("*.safetensors")) == ["model.safetensors"]
    (out / "adapters" / "ft0" / "notes.txt").write_text("mine")
    r = runner.invoke(app, ["export", str(llama / "ties"), "--format", "peft", "--out", str(out), "--overwrite"])
    assert r.exit_code == 2 and "is not a flexmerge peft export" in r.output
    assert (out / "adapters" / "ft0" / "notes.txt").exists()

    import flexmerge.peft_export as pe

    calls = []

    def failing(task, *args, **kwargs):
        calls.append(task)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(task, *args, **kwargs)

    real = pe.task_adapter
    monkeypatch.setattr(pe, "task_adapter", failing)
    r = runner.invoke(app, ["export", str(llama / "ties"), "--format", "peft", "--out", str(tmp_path / "half")])
    assert r.exit_code == 2 and "No space left" in r.output and calls == ["ft0", "ft1"]
    assert not (tmp_path / "half").exists() and not list(tmp_path.glob(".half*"))
    shutil.rmtree(out)
