"""mergekit configs: `flexmerge merge --config mergekit.yml` gives the artifact of the equivalent
flexmerge config, follows mergekit's formulas at 1x (gradients, filters, slices and stages
resolved as mergekit resolves them; the formulas are written here), carries the tokenizer and
chat template it asks for, and refuses what flexmerge cannot honour in one sentence."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from flexmerge.cli import app
from flexmerge.mergekit import CHATML, task_name

runner = CliRunner()


def _mergekit_yaml(root: Path, models: dict[str, Path], method: str, model_params: dict | None = None,
                   parameters: dict | None = None, **top) -> Path:
    doc = {"merge_method": method, "base_model": "zoo/base.safetensors",
           "models": [{"model": f"zoo/{p.name}", **({"parameters": model_params} if model_params else {})}
                      for p in models.values()], **top}
    if parameters:
        doc["parameters"] = parameters
    (root / "mergekit.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return root / "mergekit.yml"


def _flexmerge_yaml(root: Path, models: dict[str, Path], method: str, params: dict, size: float) -> Path:
    doc = {"base": "zoo/base.safetensors", "models": {n: f"zoo/{p.name}" for n, p in models.items()},
           "method": method, "params": params, "size": size}
    (root / "flexmerge.yml").write_text(yaml.safe_dump(doc))
    return root / "flexmerge.yml"


def _merge(config: Path, out: Path, *extra: str):
    return runner.invoke(app, ["merge", "--config", str(config), "--out", str(out), *extra])


def _artifact(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    manifest = json.loads((path / "manifest.json").read_text())
    tensors = {k: v for s in manifest["shards"] for k, v in load_file(path / s["file"]).items()}
    return manifest, tensors


CASES = [  # (mergekit method, per-model parameters, global parameters, extra keys, flexmerge method, params)
    ("task_arithmetic", {"weight": 0.5}, {"lambda": 1.2}, {},
     "task_arithmetic", {"lam": 0.6, "convention": "sum"}),
    ("task_arithmetic", None, {"weight": 0.7, "normalize": True, "lambda": 0.9}, {},
     "task_arithmetic", {"lam": 0.9, "convention": "mean"}),
    ("ties", {"weight": 1.0, "density": 0.3}, {"lambda": 0.9, "int8_mask": True}, {"dtype": "float16"},
     "ties", {"keep": 0.3, "trim": "floor", "trim_scope": "tensor", "lam": 0.9, "combine": "mean", "dtype": "float16"}),
    ("dare_ties", {"weight": 0.5, "density": 0.6}, None, {"out_dtype": "bfloat16", "dtype": "float32"},
     "ties", {"keep": 1.0, "dare": 0.4, "combine": "sum", "lam": 0.5, "dtype": "bfloat16"}),
    ("dare_linear", {"weight": 1.0, "density": 0.7}, {"normalize": True}, {},
     "dare", {"dare": 0.3, "convention": "mean", "lam": 1.0}),
]


@pytest.mark.parametrize("method, model_params, parameters, top, fm_method, fm_params", CASES)
def test_a_mergekit_config_gives_the_artifact_of_the_equivalent_flexmerge_config(
        zoo, tmp_path, method, model_params, parameters, top, fm_method, fm_params):
    _, models = zoo
    mk = _mergekit_yaml(tmp_path, models, method, model_params, parameters, size=2, **top)
    fm = _flexmerge_yaml(tmp_path, models, fm_method, fm_params, 2)
    r = _merge(mk, tmp_path / "from-mergekit")
    assert r.exit_code == 0, r.output
    assert _merge(fm, tmp_path / "from-flexmerge").exit_code == 0
    (m1, t1), (m2, t2) = _artifact(tmp_path / "from-mergekit"), _artifact(tmp_path / "from-flexmerge")
    assert m1["tasks"] == m2["tasks"] == list(models)
    assert m1["method"] == m2["method"] and m1["blocks"] == m2["blocks"] and m1["size"] == m2["size"]
    assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)


def _merged_1x(tmp_path: Path, config: Path, key: str) -> torch.Tensor:
    r = runner.invoke(app, ["merge", "--config", str(config), "--out", str(tmp_path / "one")])
    assert r.exit_code == 0, r.output
    out = tmp_path / "task0.safetensors"
    assert runner.invoke(app, ["export", str(tmp_path / "one"), "--task", "task0", "--out", str(out)]).exit_code == 0
    return load_file(out)[key]


def test_task_arithmetic_at_1x_is_mergekits_formula(zoo, tmp_path):
    base, models = zoo
    key = "layers.1.mlp.fc1.weight"
    theta0 = load_file(base)[key]
    taus = torch.stack([load_file(p)[key] - theta0 for p in models.values()])
    config = _mergekit_yaml(tmp_path, models, "task_arithmetic", {"weight": 0.4}, {"lambda": 1.5}, size=1)
    expected = theta0 + 1.5 * (0.4 * taus).sum(0)  # mergekit: base + λ Σ w τ (normalize: false)
    torch.testing.assert_close(_merged_1x(tmp_path, config, key), expected, rtol=0, atol=1e-6)


def _magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit's `sparsify.magnitude`: the int(density·numel) largest magnitudes of one tensor."""
    k = int(density * tensor.numel())
    mask = torch.zeros_like(tensor)
    mask.view(-1)[torch.argsort(tensor.abs().view(-1), descending=True)[:k]] = 1
    return tensor * mask


@pytest.mark.parametrize("density", [1.0, 0.3])
def test_ties_at_1x_is_mergekits_formula(zoo, tmp_path, density):
    base, models = zoo
    key = "layers.0.attn.qkv.weight"
    theta0 = load_file(base)[key]
    taus = [_magnitude(load_file(p)[key] - theta0, density) for p in models.values()]
    weighted = 0.8 * torch.stack(taus)
    config = _mergekit_yaml(tmp_path, models, "ties", {"weight": 0.8, "density": density}, {"lambda": 0.7}, size=1)
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)  # mergekit get_mask("sum"), normalize: true
    mask = weighted.sign() == sign
    divisor = (0.8 * mask).sum(0)
    divisor[divisor == 0] = 1
    expected = theta0 + 0.7 * (weighted * mask).sum(0) / divisor
    torch.testing.assert_close(_merged_1x(tmp_path, config, key), expected, rtol=0, atol=1e-6)


def test_the_base_listed_among_models_is_skipped_and_task_names_come_from_paths(zoo, tmp_path):
    _, models = zoo
    for i, (name, p) in enumerate(models.items()):  # two of them in folders as ckpt.safetensors
        if i < 2:
            (tmp_path / f"run {i}").mkdir()
            shutil.copy(p, tmp_path / f"run {i}" / "ckpt.safetensors")
    doc = {"merge_method": "task_arithmetic", "base_model": "zoo/base.safetensors", "size": 3,
           "parameters": {"weight": 1.0},
           "models": [{"model": "zoo/base.safetensors"}, {"model": "run 0/ckpt.safetensors"},
                      {"model": "run 1/ckpt.safetensors"}, {"model": "zoo/task2.safetensors"}]}
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(doc))
    assert _merge(tmp_path / "mk.yml", tmp_path / "out").exit_code == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["tasks"] == ["ckpt", "ckpt-2", "task2"]
    assert task_name(Path("x/My Model (v2)!"), []) == "My-Model-v2-"
    assert task_name(Path("x/..hidden.safetensors.index.json"), ["hidden"]) == "hidden-2"



@pytest.mark.parametrize("change, message", [
    ({"merge_method": "frankenmerge"}, "unknown merge_method 'frankenmerge'; mergekit's: arcee_fusion"),
    ({"unequal": True, "merge_method": "breadcrumbs", "parameters": {"weight": 1.0, "density": 0.3}},
     "the models' density values differ (task0: 0.3, task1: 0.5"),
    ({"parameters": {"weight": 1, "rescale": False}, "merge_method": "dare_ties"}, "rescale: false"),
    ({"parameters": {"weight": 1, "rescale": True}, "merge_method": "ties"}, "rescale: true"),
    ({"parameters": {"weight": 1, "density": 0}, "merge_method": "ties"}, "density must be in (0, 1]"),
    ({"parameters": {"weight": 1, "normalize": "maybe"}}, "parameter 'normalize': Input should be a valid boolean"),
    ({"parameters": {"weight": [{"filter": "mlp", "value": 1, "scale": 2}]}}, "a condition is {filter: SUBSTRING"),
    ({"parameters": {}}, "parameter 'weight' is required (mergekit has no default) and is not set for embed.weight"),
    ({"dtype": "int8"}, "dtype 'int8' is not supported"),
    ({"hub": "meta-llama/Llama-3.1-8B"}, "'meta-llama/Llama-3.1-8B' is not a local path (a Hugging Face Hub id?)"),
    ({"hub": "zoo/task0.safetensors+loras/a"}, "applies a LoRA on load"),
    ({"hub": "nowhere/x/y.safetensors"}, "not found (relative paths are taken from the config's folder"),
    ({"method": "ties"}, "unknown key(s) 'method'"),
    ({"base_model": None}, "task_arithmetic needs base_model"),
    ({"tokenizer_source": "base"}, "tokenizer_source base: the base"),
])
def test_what_flexmerge_cannot_honour_is_a_clear_error(zoo, tmp_path, change, message):
    _, models = zoo
    doc = {"merge_method": "task_arithmetic", "base_model": "zoo/base.safetensors", "size": 2,
           "parameters": {"weight": 1.0}, "models": [{"model": f"zoo/{p.name}"} for p in models.values()]}
    change = dict(change)
    if change.pop("unequal", False):
        doc["models"][1]["parameters"] = {"density": 0.5}
    if "hub" in change:
        doc["models"][0]["model"] = change.pop("hub")
    doc.update(change)
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(doc))
    r = _merge(tmp_path / "mk.yml", tmp_path / "out")
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split()), r.output
    assert not (tmp_path / "out").exists()


# --- tiny Llama models, as Hugging Face directories -------------------------------------------------

LAYERS, HIDDEN, VOCAB = 4, 8, 16
BASE_TEMPLATE = "{% for m in messages %}BASE {{ m['content'] }}{% endfor %}"
OWN_TEMPLATE = "{% for m in messages %}OWN {{ m['content'] }}{% endfor %}"


def _llama_state(g: torch.Generator) -> dict[str, torch.Tensor]:
    """A LlamaForCausalLM's tensors (untied lm_head), small."""
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (HIDDEN,), f"{p}.post_attention_layernorm.weight": (HIDDEN,),
                       **{f"{p}.self_attn.{x}_proj.weight": (HIDDEN, HIDDEN) for x in "qkvo"},
                       f"{p}.mlp.gate_proj.weight": (12, HIDDEN), f"{p}.mlp.up_proj.weight": (12, HIDDEN),
                       f"{p}.mlp.down_proj.weight": (HIDDEN, 12)})
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def _write_hf(directory: Path, state: dict[str, torch.Tensor], side: dict[str, str] | None = None) -> Path:
    directory.mkdir(parents=True)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": 12, "num_hidden_layers": LAYERS, "num_attention_heads": 2,
              "num_key_value_heads": 2, "vocab_size": VOCAB, "tie_word_embeddings": False}
    (directory / "config.json").write_text(json.dumps(config))
    for name, text in (side or {}).items():
        (directory / name).write_text(text)
    return directory


@pytest.fixture
def llama(tmp_path) -> dict[str, Path]:
    """base (with a tokenizer and an inline chat template) and model_a (its own tokenizer, one more
    token, and template), model_b, model_c: fine-tunes of it (base + noise on every tensor)."""
    g = torch.Generator().manual_seed(0)
    base = _llama_state(g)
    tokenizer = {"tokenizer.json": json.dumps({"model": {"vocab": {"base": 0}}}),
                 "tokenizer_config.json": json.dumps({"chat_template": BASE_TEMPLATE, "model_max_length": 64})}
    dirs = {"base": _write_hf(tmp_path / "base", base, tokenizer)}
    for name in ("model_a", "model_b", "model_c"):
        own = {"tokenizer.json": json.dumps({"model": {"vocab": {"base": 0, "own": 1}}}),  # the base's ids kept
               "tokenizer_config.json": json.dumps({"chat_template": OWN_TEMPLATE})} if name == "model_a" else None
        dirs[name] = _write_hf(tmp_path / name, {k: v + 0.05 * torch.randn(v.shape, generator=g)
                                                 for k, v in base.items()}, own)
    return dirs


def _write_config(tmp_path: Path, text: str, name: str = "mk.yml") -> Path:
    (tmp_path / name).write_text(text)
    return tmp_path / name


def _export_1x(tmp_path: Path, config: Path, task: str | None = None) -> dict[str, torch.Tensor]:
    """The merged model of `config` at --size 1 (one task's export; at 1x they are one model)."""
    r = runner.invoke(app, ["merge", "--config", str(config), "--size", "1", "--out", str(tmp_path / "art")])
    assert r.exit_code == 0, r.output
    task = task or json.loads((tmp_path / "art" / "manifest.json").read_text())["tasks"][0]
    r = runner.invoke(app, ["export", str(tmp_path / "art"), "--task", task, "--out", str(tmp_path / "exp")])
    assert r.exit_code == 0, r.output
    return load_file(tmp_path / "exp" / "model.safetensors")


def _layer_t(key: str) -> float:
    """mergekit's position of a tensor: layer i of L has t = i / (L − 1); others have t = 0."""
    parts = key.split(".")
    return int(parts[2]) / (LAYERS - 1) if parts[1] == "layers" else 0.0


def _gradient(values: list[float], t: float) -> float:
    """A gradient's value at t: piecewise linear through equally spaced values (np.interp)."""
    return float(np.interp(t, np.linspace(0.0, 1.0, len(values)), values))


def _states(llama: dict[str, Path], *names: str) -> list[dict[str, torch.Tensor]]:
    return [load_file(llama[n] / "model.safetensors") for n in names]


def test_gradients_and_filters_give_each_tensor_its_own_weights_and_lambda(llama, tmp_path):
    config = _write_config(tmp_path, f"""
merge_method: task_arithmetic
base_model: {llama['base']}
models:
  - model: {llama['model_a']}
    parameters: {{weight: [0, 0.5, 1]}}
  - model: {llama['model_b']}
    parameters:
      weight:
        - filter: mlp
          value: [1, 0.2]
        - filter: no-tensor-has-this
          value: 3
  - model: {llama['model_c']}
    parameters: {{weight: 0.3}}
parameters: {{weight: 0.7, lambda: [1.0, 0.5]}}
""")
    got = _export_1x(tmp_path, config)
    theta0, a, b, c = _states(llama, "base", "model_a", "model_b", "model_c")
    for key, x0 in theta0.items():
        t = _layer_t(key)
        w_b = _gradient([1, 0.2], t) if "mlp" in key else 0.7  # the unmatched filter falls through to the config's
        expected = x0 + _gradient([1.0, 0.5], t) * (
            _gradient([0, 0.5, 1], t) * (a[key] - x0) + w_b * (b[key] - x0) + 0.3 * (c[key] - x0))
        torch.testing.assert_close(got[key], expected, rtol=0, atol=1e-5, msg=key)
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert len(manifest["method"]["tensor_params"]) >= LAYERS  # a rule per group of alike tensors


def test_a_density_filter_trims_each_tensor_as_mergekits_ties(llama, tmp_path):
    config = _write_config(tmp_path, f"""
merge_method: ties
base_model: {llama['base']}
models:
  - model: {llama['model_a']}
  - model: {llama['model_b']}
parameters:
  weight: 1.0
  density:
    - filter: self_attn
      value: 0.25
    - value: [0.9, 0.5]
""")
    got = _export_1x(tmp_path, config)
    theta0, *models = _states(llama, "base", "model_a", "model_b")
    for key, x0 in theta0.items():
        density = 0.25 if "self_attn" in key else _gradient([0.9, 0.5], _layer_t(key))
        taus = torch.stack([_magnitude(m[key] - x0, density) for m in models])
        sign = torch.where(taus.sum(0) >= 0, 1.0, -1.0)
        mask = (taus.sign() == sign).float()
        divisor = mask.sum(0)
        divisor[divisor == 0] = 1
        torch.testing.assert_close(got[key], x0 + (taus * mask).sum(0) / divisor, rtol=0, atol=1e-5, msg=key)


def test_slices_of_the_same_layers_of_every_model_are_a_whole_model_merge_with_parameters_per_slice(llama, tmp_path):
    a, b = llama["model_a"], llama["model_b"]
    config = _write_config(tmp_path, f"""
merge_method: task_arithmetic
base_model: {llama['base']}
slices:
  - sources:
      - {{model: {a}, layer_range: [0, 1], parameters: {{weight: 2.0}}}}
      - {{model: {b}, layer_range: [0, 1]}}
    parameters: {{weight: 0.5}}
  - sources:
      - {{model: {a}, layer_range: [1, {LAYERS}]}}
      - {{model: {b}, layer_range: [1, {LAYERS}]}}
    parameters: {{weight: [0.2, 1.0]}}
""")
    got = _export_1x(tmp_path, config)
    theta0, sa, sb = _states(llama, "base", "model_a", "model_b")
    for key, x0 in theta0.items():
        parts = key.split(".")
        if parts[1] == "layers":
            i = int(parts[2])
            w_a, w_b = (2.0, 0.5) if i == 0 else (_gradient([0.2, 1.0], (i - 1) / (LAYERS - 2)),) * 2
        else:  # embeddings take the first slice's parameters, the final norm and head the last's, at t = 0
            w_a, w_b = (2.0, 0.5) if "embed" in key else (0.2, 0.2)
        expected = x0 + w_a * (sa[key] - x0) + w_b * (sb[key] - x0)
        torch.testing.assert_close(got[key], expected, rtol=0, atol=1e-5, msg=key)


def _slices(*ranges: list[tuple[str, int, int]]) -> str:
    return "".join("  - sources:\n" + "".join(f"      - {{model: {m}, layer_range: [{lo}, {hi}]}}\n"
                                            for m, lo, hi in sources) for sources in ranges)


@pytest.mark.parametrize("layout, message", [
    ([[("a", 0, 2), ("b", 1, 3)]], "slices[0] takes different layers from different models ([0, 2], [1, 3]), "
                                   "which moves layers: use mergekit-yaml for it"),
    ([[("a", 0, 2), ("b", 0, 2)], [("a", 3, 4), ("b", 3, 4)]], "the slices' layer ranges ([0, 2], [3, 4]) do not "
                                                               "follow each other from layer 0"),
    ([[("a", 0, 4), ("b", 0, 4)], [("a", 0, 4), ("b", 0, 4)]], "do not follow each other from layer 0"),
    ([[("a", 0, 2), ("b", 0, 2)], [("a", 2, 4), ("c", 2, 4)]], "the slices take their layers from different models"),
    ([[("a", 0, 3), ("b", 0, 3)]], "the slices end at layer 3, the models have 4"),
])
def test_slices_that_move_or_stack_layers_are_refused_in_one_sentence(llama, tmp_path, layout, message):
    names = {"a": llama["model_a"], "b": llama["model_b"], "c": llama["model_c"]}
    layout = [[(names[m], lo, hi) for m, lo, hi in sources] for sources in layout]
    config = _write_config(tmp_path, f"merge_method: task_arithmetic\nbase_model: {llama['base']}\n"
                                     f"parameters: {{weight: 1.0}}\nslices:\n{_slices(*layout)}")
    _assert_refused(tmp_path, config, message)


def _assert_refused(tmp_path: Path, config: Path, message: str, command: str = "merge") -> str:
    """The command fails (exit 2) with one line that holds `message`, and writes nothing."""
    args = [command, "--config", str(config), "--out", str(tmp_path / "refused")]
    r = runner.invoke(app, args + (["--size", "1"] if command == "merge" else []))
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert message in " ".join(r.output.split()), r.output
    assert not (tmp_path / "refused").exists()
    return lines[0]


@pytest.mark.parametrize("doc, message", [
    ("merge_method: passthrough\nslices:\n  - sources: [{model: $a, layer_range: [0, 4]}]\n"
     "  - sources: [{model: $a, layer_range: [2, 4]}]\n",
     "passthrough stacks layers of its slices into a model of another depth, an architecture its inputs do not have; "
     "use mergekit-yaml"),
    ("merge_method: passthrough\nmodels:\n  - model: $a\n    parameters: {scale: [{filter: o_proj, value: 0}]}\n",
     "passthrough copies one model (with per-tensor scales): there is nothing to merge; use mergekit-yaml"),
    ("base_model: $a\ngate_mode: hidden\ndtype: bfloat16\nexperts:\n  - source_model: $a\n"
     "    positive_prompts: [hello]\n  - source_model: $b\n    positive_prompts: [doctor]\n",
     "a mergekit-moe config (experts, gate_mode) builds a mixture-of-experts model, an architecture its inputs do not "
     "have, which flexmerge does not make: use mergekit-moe"),
    ("merge_method: linear\nmodels: [{model: $a}, {model: $b}]\nparameters: {weight: 1}\ntokenizer_source: union\n",
     "tokenizer source union (a vocabulary of every model's tokens) re-maps every model's embedding rows onto a new "
     "vocabulary (tokenizer surgery), which flexmerge does not do: use mergekit-yaml for it"),
    ("merge_method: task_arithmetic\nbase_model: $base\nmodels: [{model: $a}, {model: $b}]\nparameters: {weight: 1}\n"
     "tokenizer_source: $a\n", "(another model's vocabulary) re-maps every model's embedding rows"),
    ("merge_method: task_arithmetic\nbase_model: $base\nmodels: [{model: $a}, {model: $b}]\nparameters: {weight: 1}\n"
     "tokenizer: {source: base, tokens: {x: {source: $a, force: true}}}\n", "are tokenizer surgery, which changes"),
    ("merge_method: task_arithmetic\nbase_model: $base\nparameters: {weight: 1}\n"
     "modules: {text: {models: [{model: $a}]}}\n", "modules: (a merge per module of a multi-module model)"),
    ("merge_method: task_arithmetic\nbase_model: $base\nmodels: [{model: $a}, {model: $b}]\nparameters: {weight: 1}\n"
     "chat_template: not-a-template\n", "chat template 'not-a-template' is not one flexmerge knows (chatml"),
    ("merge_method: task_arithmetic\nbase_model: $base\nmodels: [{model: $a}, {model: $b}]\nparameters: {weight: 1}\n"
     "chat_template: '{{ x }}'\n", "invalid chat template '{{ x }}'"),
])
def test_what_changes_the_architecture_is_refused_in_one_sentence_naming_the_tool(llama, tmp_path, doc, message):
    text = doc.replace("$base", str(llama["base"])).replace("$a", str(llama["model_a"])).replace(
        "$b", str(llama["model_b"]))
    line = _assert_refused(tmp_path, _write_config(tmp_path, text), message)
    assert "validation error" not in line and "Field required" not in line


def test_tokenizer_source_base_and_a_chat_template_are_in_every_export(llama, tmp_path):
    config = _write_config(tmp_path, f"""
merge_method: task_arithmetic
base_model: {llama['base']}
models: [{{model: {llama['model_a']}}}, {{model: {llama['model_b']}}}]
parameters: {{weight: 0.5}}
tokenizer_source: base
chat_template: chatml
""")
    assert runner.invoke(app, ["merge", "--config", str(config), "--size", "2", "--out", str(tmp_path / "art")]
                         ).exit_code == 0
    base_tokenizer = (llama["base"] / "tokenizer.json").read_text()
    for task in ("model_a", "model_b"):
        out = tmp_path / f"export-{task}"
        assert runner.invoke(app, ["export", str(tmp_path / "art"), "--task", task, "--out", str(out)]).exit_code == 0
        assert (out / "tokenizer.json").read_text() == base_tokenizer  # model_a's own tokenizer is not used
        assert (out / "chat_template.jinja").read_text() == CHATML
        assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())  # not two templates
        assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 64


def test_without_tokenizer_source_each_task_keeps_its_own_and_a_literal_template_is_carried(llama, tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    config = _write_config(tmp_path, f"""
merge_method: task_arithmetic
base_model: {llama['base']}
models: [{{model: {llama['model_a']}}}, {{model: {llama['model_b']}}}]
parameters: {{weight: 0.5}}
chat_template: {json.dumps(template)}
""")
    assert runner.invoke(app, ["merge", "--config", str(config), "--size", "1", "--out", str(tmp_path / "art")]
                         ).exit_code == 0
    for task, tokenizer in (("model_a", llama["model_a"]), ("model_b", llama["base"])):  # model_b has none: the base's
        out = tmp_path / f"export-{task}"
        assert runner.invoke(app, ["export", str(tmp_path / "art"), "--task", task, "--out", str(out)]).exit_code == 0
        assert (out / "tokenizer.json").read_text() == (tokenizer / "tokenizer.json").read_text()
        assert (out / "chat_template.jinja").read_text() == template


def test_chat_template_auto_takes_the_template_most_models_carry(llama, tmp_path):
    for name in ("model_b", "model_c"):  # two of four carry OWN_TEMPLATE, one BASE_TEMPLATE
        shutil.copy(llama["model_a"] / "tokenizer_config.json", llama[name] / "tokenizer_config.json")
    config = _write_config(tmp_path, f"""
merge_method: task_arithmetic
base_model: {llama['base']}
models: [{{model: {llama['model_a']}}}, {{model: {llama['model_b']}}}, {{model: {llama['model_c']}}}]
parameters: {{weight: 0.5}}
chat_template: auto
""")
    assert runner.invoke(app, ["merge", "--config", str(config), "--size", "1", "--out", str(tmp_path / "art")]
                         ).exit_code == 0
    assert runner.invoke(app, ["export", str(tmp_path / "art"), "--task", "model_b", "--out", str(tmp_path / "e")]
                         ).exit_code == 0
    assert (tmp_path / "e" / "chat_template.jinja").read_text() == OWN_TEMPLATE


def test_named_stages_run_in_order_and_a_later_stage_reads_an_earlier_ones_output(llama, tmp_path):
    config = _write_config(tmp_path, f"""
merge_method: task_arithmetic
base_model: {llama['base']}
models:
  - model: first-merge
    parameters: {{weight: 1.0}}
  - model: {llama['model_c']}
    parameters: {{weight: 0.5}}
---
name: first-merge
merge_method: task_arithmetic
base_model: {llama['base']}
models: [{{model: {llama['model_a']}}}, {{model: {llama['model_b']}}}]
parameters: {{weight: 0.5, normalize: false}}
""")
    r = runner.invoke(app, ["merge", "--config", str(config), "--size", "1", "--out", str(tmp_path / "art")])
    assert r.exit_code == 0, r.output
    assert "stage first-merge" in r.output
    stage = tmp_path / "art.stages" / "first-merge"
    assert (stage / "config.json").exists() and (stage / "model.safetensors").exists()
    assert json.loads((tmp_path / "art" / "manifest.json").read_text())["tasks"] == ["first-merge", "model_c"]
    r = runner.invoke(app, ["export", str(tmp_path / "art"), "--task", "model_c", "--out", str(tmp_path / "exp")])
    assert r.exit_code == 0, r.output
    got = load_file(tmp_path / "exp" / "model.safetensors")
    theta0, a, b, c = _states(llama, "base", "model_a", "model_b", "model_c")
    for key, x0 in theta0.items():
        first = x0 + 0.5 * (a[key] - x0) + 0.5 * (b[key] - x0)
        expected = x0 + 1.0 * (first - x0) + 0.5 * (c[key] - x0)
        torch.testing.assert_close(got[key], expected, rtol=0, atol=1e-5, msg=key)
    r = runner.invoke(app, ["merge", "--config", str(config), "--size", "1", "--out", str(tmp_path / "art"),
                            "--overwrite"])  # a second run replaces the stage's export it wrote
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("docs, message", [
    (["name: x\n{tail}models: [{{model: y}}]\n", "name: y\n{tail}models: [{{model: x}}]\n"],
     "the stages name each other in a circle"),
    (["{tail}models: [{{model: $a}}]\n", "{tail}models: [{{model: $b}}]\n"],
     "more than one document has no name (mergekit-multi allows one final merge)"),
    (["name: x\n{tail}models: [{{model: $a}}]\n", "base: $base\nmodels: {{a: $a, b: $b}}\n"],
     "document 2 is not a mergekit config"),
])
def test_a_bad_multi_stage_config_is_refused_before_any_stage_runs(llama, tmp_path, docs, message):
    tail = f"merge_method: task_arithmetic\nbase_model: {llama['base']}\nparameters: {{weight: 1}}\n"
    text = "---\n".join(d.format(tail=tail) for d in docs)
    text = text.replace("$base", str(llama["base"])).replace("$a", str(llama["model_a"])).replace(
        "$b", str(llama["model_b"]))
    _assert_refused(tmp_path, _write_config(tmp_path, text), message)
    assert not (tmp_path / "refused.stages").exists()


def test_plan_of_a_multi_stage_config_is_refused_in_one_sentence(llama, tmp_path):
    doc = f"merge_method: task_arithmetic\nbase_model: {llama['base']}\nparameters: {{weight: 1}}\n"
    text = f"name: x\n{doc}models: [{{model: {llama['model_a']}}}]\n---\n{doc}models: [{{model: x}}]\n"
    _assert_refused(tmp_path, _write_config(tmp_path, text), "2 YAML documents are mergekit-multi's stages",
                    command="plan")


def test_parameters_the_method_does_not_read_are_ignored_with_a_warning(llama, tmp_path):
    config = _write_config(tmp_path, f"""
merge_method: task_arithmetic
base_model: {llama['base']}
models:
  - model: {llama['model_a']}
    parameters: {{weight: 1.0, gamma: 0.1}}
  - model: {llama['model_b']}
parameters: {{weight: 1.0, t: 0.3}}
""")
    r = runner.invoke(app, ["merge", "--config", str(config), "--size", "1", "--out", str(tmp_path / "art")])
    assert r.exit_code == 0, r.output
    assert "task_arithmetic does not read t (in parameters); gamma (in model_a): ignored, as mergekit ignores it" \
        in " ".join(r.output.split()), r.output


def test_each_models_own_density_trims_its_task_vector_as_mergekits_ties(llama, tmp_path):
    config = _write_config(tmp_path, f"""
merge_method: ties
base_model: {llama['base']}
models:
  - model: {llama['model_a']}
    parameters: {{density: 0.3, weight: 1.0}}
  - model: {llama['model_b']}
    parameters: {{density: [0.9, 0.5], weight: 0.5}}
  - model: {llama['model_c']}
    parameters:
      density: 1.0
      weight: [{{filter: mlp, value: 0.7}}, {{value: 0.2}}]
parameters: {{normalize: false, lambda: 1.2}}
""")
    got = _export_1x(tmp_path, config)
    theta0, *models = _states(llama, "base", "model_a", "model_b", "model_c")
    for key, x0 in theta0.items():
        t = _layer_t(key)
        densities = [0.3, _gradient([0.9, 0.5], t), 1.0]
        w = torch.tensor([1.0, 0.5, 0.7 if "mlp" in key else 0.2]).view(-1, *[1] * x0.dim())
        weighted = w * torch.stack([_magnitude(m[key] - x0, d) for m, d in zip(models, densities)])
        sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)  # normalize false: the agreeing weighted sum
        expected = x0 + 1.2 * (weighted * (weighted.sign() == sign)).sum(0)
        torch.testing.assert_close(got[key], expected, rtol=0, atol=1e-5, msg=key)


def test_each_models_own_density_is_its_dare_rate(zoo):
    import flexmerge
    from flexmerge.preprocess import fitted_pipeline
    from flexmerge.taskvec import Chunk

    base, models = zoo
    tasks = flexmerge.load_tasks(base, models)
    method = flexmerge.get_method("ties", keep=1.0, dare=0.5, task_dare={"task0": 0.8, "task2": 0.1})
    deltas = fitted_pipeline(tasks, method.for_tasks(tasks.names)).deltas(tasks, Chunk("layers.1.mlp.fc1.weight", None))
    dropped = (deltas == 0).flatten(1).float().mean(1)
    for rate, expected in zip(dropped.tolist(), [0.8, 0.5, 0.1, 0.5]):
        assert abs(rate - expected) < 0.07, dropped
