"""PEFT adapters as inputs: the fine-tuned weights flexmerge derives from a LoRA or (IA)³ adapter
and its base equal peft's own `merge_and_unload()`, and adapter sets merge through the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import flexmerge
from flexmerge.errors import CheckpointError, FlexMergeError
from flexmerge.io.open import open_checkpoint
from tests.conftest import bert_config

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _bert(labels: int = 3):
    config = bert_config(labels, vocab_size=40)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


def _gpt2():
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=40, n_positions=32)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def _small_update(model, scale: float, seed: int, ia3: bool = False) -> None:
    """Adapter weights of a trained-looking size (a fresh adapter is all zeros or all ones)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name or "ia3_l" in name:
            with torch.no_grad():
                noise = scale * torch.randn(p.shape, generator=g)
                p.copy_(1 + noise if ia3 else noise)


def _adapter(make, config, root, name, seed, ia3=False):
    """(adapter dir, peft's merged state dict) for one adapter of `config` on a fresh base."""
    model = peft.get_peft_model(make(), config)
    _small_update(model, 0.02 if ia3 else 0.1, seed, ia3=ia3)
    model.save_pretrained(root / name)
    merged = model.merge_and_unload().state_dict()
    return root / name, merged


def _save_base(make, root):
    base = make()
    base.save_pretrained(root / "base")
    return root / "base"


def _assert_reads_equal(source, merged):
    keys = [k for k in merged if k in source.keys()]
    assert len(keys) == len(merged)
    for key in keys:
        assert torch.equal(source.read(key), merged[key]), key


LORA_CASES = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
    "lora-rslora-patterns-embeddings-head": dict(r=4, lora_alpha=16, use_rslora=False, target_modules=
                                                 ["query", "key", "dense", "word_embeddings"],
                                                 rank_pattern={"key": 2}, alpha_pattern={"dense": 3},
                                                 modules_to_save=["classifier"]),
    "lora-rslora-bias": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["value"], lora_bias=True),
}


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_weights_equal_peft_merge_and_unload(tmp_path, case):
    base = _save_base(_bert, tmp_path)
    adapter, merged = _adapter(_bert, peft.LoraConfig(init_lora_weights=False, **LORA_CASES[case]), tmp_path, "a", 1)
    _assert_reads_equal(open_checkpoint(adapter, base=base), merged)


def test_lora_on_gpt2_conv1d_honours_fan_in_fan_out(tmp_path):
    base = _save_base(_gpt2, tmp_path)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                             init_lora_weights=False)
    adapter, merged = _adapter(_gpt2, config, tmp_path, "a", 2)
    source = open_checkpoint(adapter, base=base)
    merged.pop("lm_head.weight")  # tied to wte; not saved
    _assert_reads_equal(source, merged)


def test_ia3_weights_equal_peft_merge_and_unload(tmp_path):
    base = _save_base(_bert, tmp_path)
    config = peft.IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"],
                            init_ia3_weights=False)
    adapter, merged = _adapter(_bert, config, tmp_path, "a", 3, ia3=True)
    source = open_checkpoint(adapter, base=base)
    _assert_reads_equal(source, merged)
    # the formula, written here: a layer scaled on its outputs scales its bias too, a feed-forward one does not
    l_value = source.weights.read("base_model.model.bert.encoder.layer.0.attention.self.value.ia3_l")
    l_ff = source.weights.read("base_model.model.bert.encoder.layer.0.output.dense.ia3_l")
    b = open_checkpoint(base)
    v = "bert.encoder.layer.0.attention.self.value"
    ff = "bert.encoder.layer.0.output.dense"
    torch.testing.assert_close(source.read(f"{v}.weight"), b.read(f"{v}.weight") * l_value, rtol=0, atol=0)
    torch.testing.assert_close(source.read(f"{v}.bias"), b.read(f"{v}.bias") * l_value.flatten(), rtol=0, atol=0)
    torch.testing.assert_close(source.read(f"{ff}.weight"), b.read(f"{ff}.weight") * l_ff, rtol=0, atol=0)
    assert torch.equal(source.read(f"{ff}.bias"), b.read(f"{ff}.bias"))


def test_lora_delta_is_the_textbook_formula(tmp_path):
    base = _save_base(_bert, tmp_path)
    adapter, _ = _adapter(_bert, peft.LoraConfig(r=4, lora_alpha=6, target_modules=["query"], init_lora_weights=False),
                          tmp_path, "a", 4)
    source, b = open_checkpoint(adapter, base=base), open_checkpoint(base)
    q = "bert.encoder.layer.1.attention.self.query"
    A = source.weights.read(f"base_model.model.{q}.lora_A.weight")
    B = source.weights.read(f"base_model.model.{q}.lora_B.weight")
    torch.testing.assert_close(source.read(f"{q}.weight") - b.read(f"{q}.weight"), 6 / 4 * B @ A)


def _two_adapters(tmp_path, labels=(3, 3)):
    base = _save_base(_bert, tmp_path)
    dirs, merged = {}, {}
    for i, (name, n) in enumerate(zip("ab", labels)):
        make = lambda n=n: _bert(n)  # noqa: E731
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"],
                                 init_lora_weights=False, task_type="SEQ_CLS")
        dirs[name], merged[name] = _adapter(make, config, tmp_path, name, 10 + i)
    return base, dirs, merged


def test_adapters_merge_only_what_they_touch_and_give_the_fine_tunes_at_mx(tmp_path):
    base, dirs, merged = _two_adapters(tmp_path, labels=(3, 5))
    tasks = flexmerge.load_tasks(base, dirs)
    assert tasks.mergeable and all(k.endswith(("query.weight", "value.weight")) for k in tasks.mergeable)
    assert any("key.weight" in k for k in tasks.frozen)  # untouched: zero task vectors, stored once
    assert set(tasks.specific["a"]) == {"classifier.weight", "classifier.bias"}
    flexmerge.merge_to_disk(tasks, tmp_path / "flex", max_bytes=10**12)  # everything fits: Mx
    flex = flexmerge.load(tmp_path / "flex")
    for name in dirs:
        state = flex.state_dict(name)
        for key, want in merged[name].items():
            assert torch.equal(state[key], want), key


def test_cli_merges_adapter_dirs(tmp_path):
    from typer.testing import CliRunner

    from flexmerge.cli import app

    base, dirs, merged = _two_adapters(tmp_path)
    tasks = flexmerge.load_tasks(base, dirs)
    result = CliRunner().invoke(app, ["merge", "--base", str(base), "--model", f"a={dirs['a']}", "--model",
                                      f"b={dirs['b']}", "--size", "min", "--param", "lam=0.8",
                                      "--out", str(tmp_path / "flex")])
    assert result.exit_code == 0, result.output
    flex = flexmerge.load(tmp_path / "flex")
    q = "bert.encoder.layer.0.attention.self.query.weight"
    b = open_checkpoint(base).read(q)
    want = b + 0.8 * ((merged["a"][q] - b) + (merged["b"][q] - b)) / 2  # task arithmetic, mean convention
    torch.testing.assert_close(flex.state_dict("a")[q], want, rtol=1e-6, atol=1e-6)


def test_an_adapter_for_another_base_is_a_clear_error(tmp_path):
    _save_base(_gpt2, tmp_path)
    bert_base = tmp_path / "bert"
    _bert().save_pretrained(bert_base)
    adapter, _ = _adapter(_gpt2, peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                                                 init_lora_weights=False), tmp_path, "a", 5)
    with pytest.raises(CheckpointError, match="targets module 'transformer.h.0.attn.c_attn'.*adapter's base"):
        open_checkpoint(adapter, base=bert_base)


def test_an_adapter_whose_shapes_do_not_fit_the_base_is_a_clear_error(tmp_path):
    _save_base(_bert, tmp_path)
    adapter, _ = _adapter(_bert, peft.LoraConfig(r=2, target_modules=["query"], init_lora_weights=False),
                          tmp_path, "a", 6)
    wider = tmp_path / "wider"
    transformers.BertForSequenceClassification(transformers.BertConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=40,
        max_position_embeddings=32)).save_pretrained(wider)
    with pytest.raises(CheckpointError, match="do not make the base's .*query.weight of shape \\[48, 48\\]"):
        open_checkpoint(adapter, base=wider)


@pytest.mark.parametrize("change, message", [
    ({"peft_type": "LOHA"}, "peft_type 'LOHA' is not supported"),
    ({"use_dora": True}, "use_dora=True is not supported"),
    ({"r": 3}, "rank 2 in the weights but r=3"),
])
def test_unsupported_or_inconsistent_adapter_configs_are_clear_errors(tmp_path, change, message):
    base = _save_base(_bert, tmp_path)
    adapter, _ = _adapter(_bert, peft.LoraConfig(r=2, target_modules=["query"], init_lora_weights=False),
                          tmp_path, "a", 7)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(FlexMergeError, match=message):
        open_checkpoint(adapter, base=base)


def test_an_adapter_needs_its_base(tmp_path):
    adapter, _ = _adapter(_bert, peft.LoraConfig(r=2, target_modules=["query"], init_lora_weights=False),
                          tmp_path, "a", 8)
    with pytest.raises(CheckpointError, match="is a PEFT adapter: it can only be read against its base"):
        open_checkpoint(adapter)


def test_an_adapter_task_exports_with_its_own_config_and_the_base_tokenizer(tmp_path):
    """Heads of 3 and 5 labels: each adapter dir holds its task's config.json (as a user would put
    there); the tokenizer comes from the base. Each export loads with from_pretrained and gives
    the fine-tune's logits at Mx."""
    base, dirs, merged = _two_adapters(tmp_path, labels=(3, 5))
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(35)]]
    transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(base)
    for name, n in zip("ab", (3, 5)):
        _bert(n).config.save_pretrained(dirs[name])
    flexmerge.merge_to_disk(flexmerge.load_tasks(base, dirs), tmp_path / "flex", max_bytes=10**12)
    flex = flexmerge.load(tmp_path / "flex")
    for name, n in zip("ab", (3, 5)):
        out = flexmerge.export(flex, name, tmp_path / f"export-{name}")
        model = transformers.BertForSequenceClassification.from_pretrained(out).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(out)
        want = _bert(n)
        want.load_state_dict(merged[name])
        batch = tokenizer(["w1 w2 w3", "w4"], padding=True, return_tensors="pt")
        with torch.no_grad():
            assert model.config.num_labels == n
            assert torch.equal(model(**batch).logits, want.eval()(**batch).logits)


def test_a_task_named_base_is_refused(tmp_path):
    base, dirs, _ = _two_adapters(tmp_path)
    with pytest.raises(FlexMergeError, match="task name 'base' is reserved"):
        flexmerge.load_tasks(base, {"base": dirs["a"], "b": dirs["b"]})
