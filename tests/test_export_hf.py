"""HF exports as users expect them: sharded weights with an index, out dtype, tokenizer, generation
config, chat template (the task's own or the base's), and a model card that reproduces the merge."""

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
from flexmerge.flexmodel.export import plan_shards
from flexmerge.io.side_files import pick_side_files

transformers = pytest.importorskip("transformers")
runner = CliRunner()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(55)]
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def _tokenizer(root: Path, lower: bool):
    """Cased or not, so the export's tokenizer can be told apart ("W1" is [UNK] only when cased);
    a `vocab` dict: recent transformers read a bare vocab_file as empty (every word [UNK])."""
    tokenizer = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=lower)
    assert (tokenizer("W1")["input_ids"][1] == VOCAB.index("w1")) == lower
    return tokenizer


@pytest.fixture
def hf_models(tmp_path):
    """A base (tokenizer + chat template + generation config) and fine-tunes a, b, c of it: a has its
    own tokenizer (cased, no template) and generation config; b and c have weights and config only."""
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=len(VOCAB), max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(cfg).eval()
    base.save_pretrained(tmp_path / "base")
    tok = _tokenizer(tmp_path, lower=True)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(tmp_path / "base")
    transformers.GenerationConfig(max_new_tokens=5).save_pretrained(tmp_path / "base")
    for i, name in enumerate("abc"):
        torch.manual_seed(10 + i)
        ft = transformers.BertForSequenceClassification(cfg).eval()
        ft.load_state_dict({k: v + 0.02 * torch.randn_like(v) for k, v in base.state_dict().items()})
        ft.save_pretrained(tmp_path / name)
    _tokenizer(tmp_path, lower=False).save_pretrained(tmp_path / "a")
    transformers.GenerationConfig(max_new_tokens=7).save_pretrained(tmp_path / "a")
    return tmp_path / "base", {n: tmp_path / n for n in "abc"}


def _merge(base, models, out, size="2"):
    flags = [x for n, d in models.items() for x in ("--model", f"{n}={d}")]
    r = runner.invoke(app, ["merge", "--base", str(base), *flags, "--method", "ties", "--size", size, "--out", str(out)])
    assert r.exit_code == 0, r.output


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_sharded_bf16_export_loads_with_from_pretrained_and_its_tokenizer(hf_models, tmp_path):
    base, models = hf_models
    _merge(base, models, tmp_path / "flex")
    out = tmp_path / "a-export"
    r = runner.invoke(app, ["export", str(tmp_path / "flex"), "--task", "a", "--out", str(out),
                            "--out-dtype", "bfloat16", "--max-shard-size", "20kB"])
    assert r.exit_code == 0, r.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    tensors = {k: v for s in shards for k, v in load_file(out / s).items()}
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    for s in shards:  # bounded, unless one tensor alone is bigger than the limit
        part = load_file(out / s)
        assert sum(t.nbytes for t in part.values()) <= 20_000 or len(part) == 1

    expected = flexmerge.load(tmp_path / "flex").state_dict("a")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype="auto").eval()
    assert model.dtype == torch.bfloat16
    for k, v in model.state_dict().items():
        if k in expected:
            assert torch.equal(v, expected[k].to(torch.bfloat16)), k
    assert all(t.dtype == torch.bfloat16 for t in tensors.values() if t.is_floating_point())

    tok = transformers.AutoTokenizer.from_pretrained(out)
    own = transformers.AutoTokenizer.from_pretrained(models["a"])
    assert tok("W1 w2")["input_ids"] == own("W1 w2")["input_ids"]  # a's cased tokenizer, not the base's
    assert tok.chat_template == TEMPLATE  # a has none: the base's
    assert transformers.GenerationConfig.from_pretrained(out).max_new_tokens == 7


def test_a_task_without_side_files_gets_the_bases_and_a_single_file_when_it_fits(hf_models, tmp_path):
    base, models = hf_models
    _merge(base, models, tmp_path / "flex")
    out = tmp_path / "b-export"
    r = runner.invoke(app, ["export", str(tmp_path / "flex"), "--task", "b", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("W1 w2")["input_ids"] == transformers.AutoTokenizer.from_pretrained(base)("W1 w2")["input_ids"]
    assert tok.chat_template == TEMPLATE
    assert transformers.GenerationConfig.from_pretrained(out).max_new_tokens == 5
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.float32


def test_the_card_has_front_matter_the_sharing_and_a_config_that_reproduces_the_merge(hf_models, tmp_path):
    base, models = hf_models
    _merge(base, models, tmp_path / "flex", size="1.5")
    out = tmp_path / "c-export"
    assert runner.invoke(app, ["export", str(tmp_path / "flex"), "--task", "c", "--out", str(out)]).exit_code == 0
    card = (out / "README.md").read_text()
    front = _front_matter(card)
    assert front == {"base_model": "base", "tags": ["merge", "flexmerge"], "library_name": "transformers"}
    assert str(tmp_path) not in card  # names, never local paths
    flex = flexmerge.load(tmp_path / "flex")
    assert "`ties`" in card and "| keep | `0.2` |" in card and f"{flex.size:.4f}x" in card
    groups = flex.groups_of("c")
    alone = sum(g == ("c",) for g in groups)
    assert (f"| (its own copy) | {alone} |" in card) == (alone > 0)
    assert sum(int(line.split("|")[2]) for line in card.splitlines()
               if line.startswith("| ") and line.count("|") == 4 and line.split("|")[2].strip().isdigit()) == len(groups)

    config = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert config["base"] == "base" and config["models"] == {"a": "a", "b": "b", "c": "c"}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))  # the card's names are paths beside it
    r = runner.invoke(app, ["merge", "--config", str(tmp_path / "merge.yaml"), "--out", str(tmp_path / "again")])
    assert r.exit_code == 0, r.output
    again = flexmerge.load(tmp_path / "again")
    assert again.assignment == flex.assignment
    for k, v in flex.state_dict("c").items():
        assert torch.equal(v, again.state_dict("c")[k]), k


def test_base_model_is_a_hub_id_from_the_config_or_a_name_never_a_local_path(hf_models, tmp_path):
    base, models = hf_models
    config = json.loads((base / "config.json").read_text())
    for recorded, expected in (("google-bert/bert-base-uncased", "google-bert/bert-base-uncased"),
                               (str(base), "base"), ("../secret/model", "base")):
        (base / "config.json").write_text(json.dumps({**config, "_name_or_path": recorded}))
        tasks = flexmerge.load_tasks(base, models)
        flex = flexmerge.merge(tasks, size=3.0)
        flexmerge.export(flex, "a", tmp_path / "e", overwrite=True)
        assert _front_matter((tmp_path / "e" / "README.md").read_text())["base_model"] == expected
    flex.info.pop("names")  # an artifact written before names were recorded: from its input files' paths
    flex.method["note"] = "```\n# not yaml | `x` <b>"  # hostile text from a manifest stays inside the fence
    flexmerge.export(flex, "a", tmp_path / "e", overwrite=True)
    card = (tmp_path / "e" / "README.md").read_text()
    assert _front_matter(card)["base_model"] == "base" and str(tmp_path) not in card
    config = yaml.safe_load(card.split("````yaml\n")[1].split("\n````")[0])
    assert config["models"] == {"a": "a", "b": "b", "c": "c"} and config["params"]["note"] == flex.method["note"]
    assert "| note | `    # not yaml    x   b ` |" in card


def test_overwrite_replaces_only_an_export_and_errors_are_clear(hf_models, tmp_path):
    base, models = hf_models
    _merge(base, models, tmp_path / "flex")
    flex_dir, out = str(tmp_path / "flex"), tmp_path / "e"
    assert runner.invoke(app, ["export", flex_dir, "--task", "a", "--out", str(out), "--max-shard-size", "40kB"]).exit_code == 0
    r = runner.invoke(app, ["export", flex_dir, "--task", "a", "--out", str(out), "--overwrite"])
    assert r.exit_code == 0, r.output  # a sharded export is replaced by a single-file one
    assert sorted(p.name for p in out.iterdir() if "safetensors" in p.name) == ["model.safetensors"]
    (out / "notes.txt").write_text("mine")
    r = runner.invoke(app, ["export", flex_dir, "--task", "a", "--out", str(out), "--overwrite"])
    assert r.exit_code == 2 and "is not a flexmerge export" in r.output and (out / "notes.txt").exists()

    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "README.md").write_text("---\ntags: [merge]\n---\n")
    (fake / "config.json").write_text("{}")
    r = runner.invoke(app, ["export", flex_dir, "--task", "a", "--out", str(fake), "--overwrite"])
    assert r.exit_code == 2 and "is not a flexmerge export" in r.output  # no weights flexmerge marked

    for argv, message in ((["--out-dtype", "fp8"], "unknown output dtype 'fp8'"),
                          (["--max-shard-size", "lots"], "is not a size in bytes"),
                          (["--max-shard-size", "0"], "positive size")):
        r = runner.invoke(app, ["export", flex_dir, "--task", "a", "--out", str(tmp_path / "x"), *argv])
        assert r.exit_code == 2 and message in r.output, r.output
    r = runner.invoke(app, ["export", flex_dir, "--task", "a", "--out", str(tmp_path / "x.safetensors"),
                            "--max-shard-size", "1MB"])
    assert r.exit_code == 2 and "give a directory" in r.output
    r = runner.invoke(app, ["export", flex_dir, "--task", "a", "--out", str(tmp_path / "x.safetensors"),
                            "--out-dtype", "float16"])
    assert r.exit_code == 0 and all(t.dtype == torch.float16 for t in load_file(tmp_path / "x.safetensors").values()
                                    if t.is_floating_point())
    assert not (tmp_path / "x").exists()


def test_shards_split_as_huggingface_hub_splits_them():
    hub = pytest.importorskip("huggingface_hub")
    g = torch.Generator().manual_seed(0)
    state = {f"t{i}": torch.randn(int(n), generator=g) for i, n in enumerate([300, 50, 700, 10, 200, 200, 5, 900])}
    for limit in (800, 1200, 2000, 4000, 10**6):
        split = hub.split_torch_state_dict_into_shards(state, max_shard_size=limit)
        assert plan_shards(state, limit) == list(split.filename_to_tensors.values())


def test_side_files_take_each_group_whole_from_one_directory():
    base = {"tokenizer.json": b"B", "vocab.txt": b"BV", "generation_config.json": b"BG",
            "tokenizer_config.json": json.dumps({"chat_template": "{{ base }}"}).encode()}
    own = {"config.json": b"C", "tokenizer.json": b"T"}
    picked = pick_side_files(own, base)
    assert picked == {"config.json": b"C", "tokenizer.json": b"T", "generation_config.json": b"BG",
                      "chat_template.jinja": b"{{ base }}"}  # no base vocab.txt mixed into a's tokenizer
    inline_own = {"tokenizer_config.json": json.dumps({"chat_template": "{{ own }}"}).encode()}
    assert "chat_template.jinja" not in pick_side_files(inline_own, base)  # a's own template stays in its config
    assert pick_side_files({}, base)["vocab.txt"] == b"BV"
    assert "chat_template.jinja" not in pick_side_files({}, base)  # the base's tokenizer_config carries it
