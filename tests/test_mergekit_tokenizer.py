"""mergekit's tokenizer surgery and its passthrough of one model, through `flexmerge merge --config`.

Tiny Llama models with word-level tokenizers: `base` (64 tokens), `ft0` (its tokenizer and
embeddings grown by 2 tokens), `ft1` (no tokenizer: the base's). Each expected tensor is
mergekit 0.1.5's rule written out here (mergekit/tokenizer/build.py, embed.py; its passthrough:
tensor * scale), not computed by calling mergekit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from flexmerge.cli import app
from tests.conftest import word_tokenizer

transformers = pytest.importorskip("transformers")
runner = CliRunner()
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
VOCAB, HIDDEN = 64, 16
WORDS = [f"w{i}" for i in range(VOCAB - 5)]  # after BERT's 5 special tokens: 64 in all


def _save(model_dir: Path, state: dict[str, torch.Tensor], vocab: int) -> None:
    config = transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=vocab,
                                      max_position_embeddings=32, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(state)
    model.save_pretrained(model_dir)


@pytest.fixture
def zoo(tmp_path) -> dict[str, Path]:
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=VOCAB, max_position_embeddings=32, tie_word_embeddings=False)).state_dict()
    dirs = {n: tmp_path / n for n in ("base", "ft0", "ft1")}
    _save(dirs["base"], base, VOCAB)
    word_tokenizer(WORDS).save_pretrained(dirs["base"])
    grown = {k: torch.cat([v, torch.randn(2, HIDDEN)]) if k in (EMBED, HEAD) else v for k, v in base.items()}
    _save(dirs["ft0"], {k: v + 0.01 * torch.randn_like(v) for k, v in grown.items()}, VOCAB + 2)
    tok = word_tokenizer(WORDS)
    tok.add_tokens(["<new0>", "<new1>"])
    tok.save_pretrained(dirs["ft0"])
    _save(dirs["ft1"], {k: v + 0.01 * torch.randn_like(v) for k, v in base.items()}, VOCAB)
    return dirs


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def _merge(tmp_path: Path, text: str, size: str = "1") -> Path:
    config = tmp_path / "mk.yml"
    config.write_text(text)
    out = tmp_path / f"merged-{size}"
    r = runner.invoke(app, ["merge", "--config", str(config), "--size", size, "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def _export(artifact: Path, task: str) -> Path:
    target = artifact.with_name(f"{artifact.name}-{task}")
    r = runner.invoke(app, ["export", str(artifact), "--task", task, "--out", str(target)])
    assert r.exit_code == 0, r.output
    return target


def _token_ids(model_dir: Path) -> dict[str, int]:
    return transformers.AutoTokenizer.from_pretrained(model_dir).get_vocab()


def _linear(models: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """mergekit's linear at weight 1 each (normalize): the models' mean."""
    return {k: sum(m[k] for m in models) / len(models) for k in models[0]}


def _check(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=2e-6, msg=k)


@pytest.mark.parametrize("source", ["union", "ft0"])
def test_a_union_or_a_models_vocabulary_remaps_every_models_rows_then_merges_at_any_size(zoo, tmp_path, source):
    """mergekit's union (the base's tokens, then ft0's added ones) and ft0's own vocabulary are the
    same 66 tokens here. A model lacking a token takes the row of the only model that holds it
    (ft0's rows 64, 65 for base and ft1, whose vocabulary is the base's); then linear averages."""
    models = "".join(f"  - model: {zoo[n]}\n    parameters: {{weight: 1.0}}\n" for n in ("base", "ft0", "ft1"))
    text = (f"merge_method: linear\nbase_model: {zoo['base']}\nmodels:\n{models}"
            f"tokenizer_source: {source if source == 'union' else zoo[source]}\n")
    w = {n: _weights(d) for n, d in zoo.items()}
    remapped = {n: {k: torch.cat([v, w["ft0"][k][VOCAB:]]) if k in (EMBED, HEAD) else v for k, v in w[n].items()}
                for n in ("base", "ft1")}
    remapped["ft0"] = w["ft0"]
    artifact = _merge(tmp_path, text)
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["size"] == 1.0 and manifest["tasks"] == ["base-model", "ft0", "ft1"]
    want_ids = _token_ids(zoo["ft0"])
    for task in manifest["tasks"]:
        exported = _export(artifact, task)
        _check(_weights(exported), _linear(list(remapped.values())))
        assert _token_ids(exported) == want_ids and len(want_ids) == VOCAB + 2
        assert json.loads((exported / "config.json").read_text())["vocab_size"] == VOCAB + 2
    at_3x = _merge(tmp_path, text, size="3")  # every size works: at Mx each task is its re-mapped model
    for task, name in (("base-model", "base"), ("ft0", "ft0"), ("ft1", "ft1")):
        _check(_weights(_export(at_3x, task)), remapped[name])


def test_forced_tokens_a_models_token_zeros_and_padding_rows_as_mergekit(zoo, tmp_path):
    """`tokens:` over the base's vocabulary: w3 forced from ft0 (its row of w3, in every model), w4
    forced from ft0's row 64, a new token <z> (added at id 64) of zeros; 65 rows padded to 80, the
    padding rows each model's mean row. ft0's rows past the base's vocabulary are dropped."""
    text = f"""merge_method: task_arithmetic
base_model: {zoo['base']}
models:
  - model: {zoo['ft0']}
    parameters: {{weight: 0.5}}
  - model: {zoo['ft1']}
    parameters: {{weight: 0.5}}
tokenizer:
  source: base
  pad_to_multiple_of: 16
  tokens:
    w3: {{source: {zoo['ft0']}, force: true}}
    w4:
      source: {{kind: model_token, model: {zoo['ft0']}, token_id: 64}}
      force: true
    <z>:
      source: {{kind: zero}}
"""
    w = {n: _weights(d) for n, d in zoo.items()}
    ids = _token_ids(zoo["base"])
    w3, w4 = ids["w3"], ids["w4"]

    def remap(t: torch.Tensor, donor: torch.Tensor) -> torch.Tensor:
        rows = torch.cat([t[:VOCAB].clone(), torch.zeros(1, HIDDEN)])  # <z>: id 64, zeros
        rows[w3], rows[w4] = donor[w3], donor[VOCAB]
        return torch.cat([rows, rows.mean(0, keepdim=True).expand(80 - 65, HIDDEN)])

    remapped = {n: {k: remap(v, w["ft0"][k]) if k in (EMBED, HEAD) else v for k, v in w[n].items()} for n in w}
    theta0 = remapped["base"]
    want = {k: theta0[k] + 0.5 * (remapped["ft0"][k] - theta0[k]) + 0.5 * (remapped["ft1"][k] - theta0[k])
            for k in theta0}
    artifact = _merge(tmp_path, text)
    exported = _export(artifact, "ft0")
    _check(_weights(exported), want)
    assert _token_ids(exported) == {**ids, "<z>": VOCAB}
    assert json.loads((exported / "config.json").read_text())["vocab_size"] == 80
    assert (tmp_path / "merged-1.vocabulary").is_dir()  # the re-mapped models the artifact was merged from


def test_the_union_of_a_slerp_interpolates_the_remapped_models(zoo, tmp_path):
    """slerp (t = 0.5) of base and ft0 over the union: base takes ft0's rows 64, 65 (the only model
    that holds them), then each tensor is slerped whole (mergekit's formula, written out)."""
    text = (f"merge_method: slerp\nbase_model: {zoo['base']}\nmodels:\n  - model: {zoo['base']}\n"
            f"  - model: {zoo['ft0']}\nparameters: {{t: 0.5}}\ntokenizer_source: union\n")
    base, ft0 = _weights(zoo["base"]), _weights(zoo["ft0"])
    base = {k: torch.cat([v, ft0[k][VOCAB:]]) if k in (EMBED, HEAD) else v for k, v in base.items()}
    want = {k: _slerp(0.5, base[k], ft0[k]) for k in base}
    artifact = _merge(tmp_path, text)
    _check(_weights(_export(artifact, "ft0")), want)


def _slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mergekit's slerp of two tensors taken whole; nearly parallel ones (|cos| > 0.9995) linearly."""
    x, y = a.flatten(), b.flatten()
    dot = ((x / x.norm()) * (y / y.norm())).sum().clamp(-1, 1)
    if dot.abs() > 0.9995:
        return (1 - t) * a + t * b
    theta = torch.acos(dot)
    return (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)


def test_passthrough_copies_one_model_times_its_per_tensor_scale(zoo, tmp_path):
    """mergekit's passthrough: tensor * scale, the scale resolved per tensor (o_proj 0; a gradient
    0.5 -> 2 over the 2 layers elsewhere, t = 0 outside the layers); a 1-task artifact at 1x."""
    text = (f"merge_method: passthrough\nmodels:\n  - model: {zoo['ft1']}\n    parameters:\n      scale:\n"
            "        - filter: o_proj\n          value: 0\n        - value: [0.5, 2]\n")
    artifact = _merge(tmp_path, text)
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["tasks"] == ["ft1"] and manifest["size"] == 1.0
    theta = _weights(zoo["ft1"])
    want = {k: v * (0.0 if "o_proj" in k else 2.0 if ".layers.1." in k else 0.5) for k, v in theta.items()}
    _check(_weights(_export(artifact, "ft1")), want)
    config = tmp_path / "mk.yml"
    r = runner.invoke(app, ["merge", "--config", str(config), "--size", "2", "--out", str(tmp_path / "two")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output


def test_a_plain_copy_and_a_linear_merge_of_one_model_are_that_model(zoo, tmp_path):
    theta = _weights(zoo["ft0"])
    for text in (f"merge_method: passthrough\nmodels:\n  - model: {zoo['ft0']}\n",
                 f"merge_method: linear\nbase_model: {zoo['ft0']}\nmodels:\n  - model: {zoo['ft0']}\n"
                 "    parameters: {weight: 1.0}\n"):
        artifact = _merge(tmp_path, text)
        got = _weights(_export(artifact, "ft0"))
        assert all(torch.equal(got[k], theta[k]) for k in theta) and got.keys() == theta.keys()
        assert _token_ids(artifact.with_name(f"{artifact.name}-ft0")) == _token_ids(zoo["ft0"])
        for p in tmp_path.glob("merged-1*"):
            shutil.rmtree(p)
