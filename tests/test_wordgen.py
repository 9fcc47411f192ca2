"""The generative suites on a tiny recipe: a 2-layer Llama pretrained on 2,000 WordNet entries,
two tasks fine-tuned in full (wordgen) and as LoRA adapters (wordgen-lora), swept through the CLI."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from flexmerge.cli import app
from flexmerge.errors import FlexMergeError
from flexmerge.evaluation.data import GenerationRow
from flexmerge.evaluation.generation import encode
from flexmerge.suites import SUITES, get_zoo, run_sweep
from flexmerge.suites.base import verify_zoo
from flexmerge.suites.wordgen import Pretraining, WordGenLoraSuite, WordGenSuite, wordnet
from flexmerge.suites.wordgen_data import TASKS, candidates, split_pairs, task_pairs
from flexmerge.suites.wordgen_lm import ModelShape, chat_example
from flexmerge.suites.wordnet import WORDNET_DIR

pytestmark = [pytest.mark.usefixtures("one_thread"),  # tiny models: see conftest.one_thread
              pytest.mark.skipif(not (WORDNET_DIR / "data.noun").is_file(), reason="WordNet data not installed")]

TINY_SHAPE = ModelShape(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96)
TINY_PRETRAINING = Pretraining(shape=TINY_SHAPE, steps=20, batch_size=16, entries=2000)
TASKS_2 = ["pos", "noun_category"]  # a tiny fine-tune learns pos (4 answers) a little
TINY = {"tasks": TASKS_2, "examples": (200, 20, 40), "steps": 60, "batch_size": 16, "pretraining": TINY_PRETRAINING}


def tiny_suite() -> WordGenSuite:
    return WordGenSuite(**TINY, lr=1e-3)


def tiny_lora_suite() -> WordGenLoraSuite:
    return WordGenLoraSuite(**TINY, lr=1e-2, rank=4, alpha=8)


@pytest.fixture(scope="module")
def sweep_out(tmp_path_factory):
    """The tiny wordgen suite swept by `flexmerge sweep --suite wordgen` (its zoo built on the way)."""
    root = tmp_path_factory.mktemp("wordgen")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(SUITES, "wordgen", tiny_suite)
        r = CliRunner().invoke(app, ["sweep", "--suite", "wordgen", "--methods", "task_arithmetic,ties,twin:rank=2",
                                     "--sizes", "1,1.5,2", "--cache-dir", str(root / "cache"), "--out",
                                     str(root / "out")])
    assert r.exit_code == 0, r.output
    return root, r.output


@pytest.fixture(scope="module")
def lora_zoo(sweep_out):
    logs: list[str] = []
    zoo = get_zoo(tiny_lora_suite(), sweep_out[0] / "cache", log=logs.append)
    return zoo, logs


def test_sweep_scores_exact_match_and_the_mx_point_is_the_fine_tunes(sweep_out):
    root, output = sweep_out
    zoo = get_zoo(tiny_suite(), root / "cache")
    data = json.loads((root / "out" / "results.json").read_text())
    assert "mean normalized exact match" in output and "pretrained base (no fine-tuning)" in output
    # the sweep reads the fine-tunes back from the zoo's model directories: the scores the build
    # measured on the models it had just trained, exactly
    assert data["finetuned"] == zoo.info["finetuned"]
    assert zoo.info["finetuned"]["pos"] > zoo.info["base"]["pos"]  # fine-tuning taught the task
    assert data["base"] == zoo.info["base"]
    records = data["records"]
    for rec in records:
        if rec["requested_size"] == 2:  # Mx: the fine-tuned models themselves
            assert rec["accuracy"] == rec["finetuned"] == zoo.info["finetuned"][rec["task"]]
            # (a tiny model may not learn noun_category at all: a fine-tune scoring 0 normalizes nothing)
            assert rec["normalized"] == (1.0 if rec["finetuned"] else None)
    twin_1x = [r for r in records if r["method"] == "twin:rank=2" and r["requested_size"] == 1]
    assert twin_1x and all(r["accuracy"] is None and "below the minimum size" in r["note"] for r in twin_1x)
    ta_1x = [r for r in records if r["method"] == "task_arithmetic" and r["requested_size"] == 1]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in ta_1x) and len(ta_1x) == len(TASKS_2)


def test_full_fine_tunes_train_every_tensor_and_carry_tokenizer_and_chat_template(sweep_out):
    zoo = get_zoo(tiny_suite(), sweep_out[0] / "cache")
    base = load_file(zoo.base / "model.safetensors")
    for task, path in zoo.models.items():
        assert {"config.json", "tokenizer.json", "chat_template.jinja", "model.safetensors"} <= {
            p.name for p in path.iterdir()}
        tuned = load_file(path / "model.safetensors")
        assert tuned.keys() == base.keys()
        unchanged = [k for k in base if torch.equal(base[k], tuned[k])]
        assert unchanged == [], f"{task}: {unchanged} not trained"
    config = json.loads((zoo.base / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is False
    assert config["num_key_value_heads"] < config["num_attention_heads"]


def test_training_chats_are_the_tokens_the_evaluator_decodes_from(sweep_out):
    """A fine-tune learns `prompt ids + answer ids + EOS`, where prompt ids are the chat template's
    rendering, as `flexmerge.evaluation.generation.encode` tokenizes a chat row."""
    from transformers import AutoTokenizer

    zoo = get_zoo(tiny_suite(), sweep_out[0] / "cache")
    tokenizer = AutoTokenizer.from_pretrained(zoo.base)
    line = (zoo.directory / "data" / "pos" / "test.jsonl").read_text().splitlines()[0]
    messages = json.loads(line)["messages"]
    row = GenerationRow(1, messages[1]["content"], messages=(messages[0],))
    encoded = encode(tokenizer, row, "test.jsonl", "pos")
    ids, labels = chat_example(tokenizer, messages[0]["content"], messages[1]["content"])
    assert ids == encoded.prompt + encoded.completion + [tokenizer.eos_token_id]
    assert labels == [-100] * len(encoded.prompt) + encoded.completion + [tokenizer.eos_token_id]
    assert tokenizer.decode(encoded.completion) == messages[1]["content"]


def test_lora_zoo_reuses_the_pretrained_base_and_holds_peft_adapters(sweep_out, lora_zoo):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    zoo, logs = lora_zoo
    assert not any("wordgen-base" in line for line in logs)  # the full suite's build made it
    assert (zoo.base / "model.safetensors").read_bytes() == (
        get_zoo(tiny_suite(), sweep_out[0] / "cache").base / "model.safetensors").read_bytes()
    path = zoo.models["pos"]
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    adapter = load_file(path / "adapter_model.safetensors")
    base = load_file(zoo.base / "model.safetensors")
    # what the zoo's fine-tune is (and the sweep merges): the weights peft's merge_and_unload makes ...
    state = WordGenLoraSuite(**TINY).finetuned_state(zoo.directory, "pos")
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo.base), path).merge_and_unload()
    for key, value in merged.state_dict().items():
        assert torch.equal(state[key], value), key
    # ... which is W + B A * alpha / r on the targeted projections, and the base elsewhere
    prefix = "base_model.model.model.layers.1.mlp.down_proj"
    a, b = adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"]
    key = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(state[key], base[key] + (b @ a) * (8 / 4), rtol=0, atol=1e-6)
    assert torch.equal(state["lm_head.weight"], base["lm_head.weight"])
    assert zoo.info["finetuned"]["pos"] > zoo.info["base"]["pos"]


def test_lora_sweep_mx_point_is_the_adapters(lora_zoo, tmp_path):
    zoo, _ = lora_zoo
    result, _ = run_sweep(tiny_lora_suite(), tmp_path, methods=["task_arithmetic"], sizes=[1, 2],
                          cache_dir=zoo.directory.parent, log=lambda s: None)
    assert result.finetuned == zoo.info["finetuned"]
    mx = [r for r in result.records if r.requested_size == 2]
    assert [r.accuracy for r in mx] == [zoo.info["finetuned"][t] for t in TASKS_2]


class _CutShort(FlexMergeError):
    pass


def test_a_corrupted_zoo_file_is_caught_and_the_zoo_rebuilt(sweep_out, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    shutil.copytree(sweep_out[0] / "cache", cache)
    zoo = get_zoo(tiny_suite(), cache)
    assert verify_zoo(zoo.directory) is None
    rows = zoo.directory / "data" / "pos" / "test.jsonl"
    rows.write_text(rows.read_text().replace('"noun"', '"verb"'))  # the answers changed: a different benchmark
    assert verify_zoo(zoo.directory) == "data/pos/test.jsonl fails its checksum"

    def build(self, directory, required):
        raise _CutShort("rebuild entered")

    monkeypatch.setattr(WordGenSuite, "build", build)
    logs: list[str] = []
    with pytest.raises(_CutShort):
        get_zoo(tiny_suite(), cache, log=logs.append)
    assert any("is unusable (data/pos/test.jsonl fails its checksum); rebuilding it" in line for line in logs)


def test_every_task_gives_one_answer_per_prompt_in_seeded_disjoint_splits():
    wn = wordnet()
    for task, spec in TASKS.items():
        pool = candidates(wn, task)
        assert len(pool) == len({p for p, _ in pool}) >= 1000, task  # prompts are unique: one answer each
        assert all(p and a and a == a.strip() and "_" not in a for p, a in pool), task
        pairs = task_pairs(wn, task, 384, seed=3)
        counts = Counter(a for _, a in pairs)  # the K commonest answers, as many of each
        assert len(counts) == spec.answers and set(counts.values()) == {384 // spec.answers}, task
        assert pairs == task_pairs(wn, task, 384, seed=3) != task_pairs(wn, task, 384, seed=4)
        splits = split_pairs(pairs, 20, 50, 1000)
        assert [len(splits[s]) for s in ("test", "val")] == [50, 20] and len(splits["train"]) == len(pairs) - 70
        prompts = {s: {p for p, _ in rows} for s, rows in splits.items()}
        assert not (prompts["train"] & prompts["test"] or prompts["val"] & prompts["test"] or
                    prompts["train"] & prompts["val"]), task
    assert ("Part of speech of: sweatpants", "noun") in candidates(wn, "pos")
    assert ("Category of the noun: tennis", "act") in candidates(wn, "word_category")
    words = [p.rsplit(" ", 1)[1] for p, _ in candidates(wn, "pos")]
    assert "run" not in words and "quick" not in words  # a noun and a verb (an adjective, ...): no one answer
