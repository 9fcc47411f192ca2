"""mergekit's own configs through flexmerge: does a mergekit user's config run at `--size 1`, and
does it give mergekit's tensors?

The corpus (`CORPUS`, 54 configs) is mergekit's, rebuilt on tiny Llama models:
- its shipped example configs (`examples/*.yml`, 6);
- every config its merge tests build (`tests/test_basic_merges.py`: 32, the Granite and GPT-2
  fixtures made Llama, the nuSLERP loop unrolled; `test_chat_template.py`: 2;
  `test_tokenizer.py`: 8);
- the multi-stage example of `docs/multimerge.md` and the two example configs of `docs/moe.md`;
- one config for each registered method no test exercises (dare_linear, breadcrumbs_ties, della_linear).
Hub ids become local tiny models; layer ranges are scaled to `LAYERS` layers.

Models (generated once under --work, `transformers` LlamaForCausalLM, fp32): `base` (random
init, a 64-token tokenizer), `model_a`/`model_b`/`model_c` (base + noise, no tokenizer, as
mergekit's test fixtures), `tok_padded` (a tokenizer with 4 added tokens), `tok_chatml` (2
added tokens and 2 added embedding rows).

Each config is written with its `dtype`/`out_dtype` set to float32 (mergekit computes in `dtype`,
flexmerge always in float32: so both compute in float32), run through mergekit 0.1.5
(`mergekit-yaml`, `mergekit-multi`, `mergekit-moe` from the venv of `vs_mergekit.py`) and through
`flexmerge merge --config X.yml --size 1`; at 1x every task's export is the one merged model, so
the first task's export is compared with mergekit's output, tensor by tensor (and every other
task's export with the first's). Methods that draw random numbers (DARE, DELLA) are compared by
their statistics: the fraction of entries left at the base's value and the norm of the merged
task vector, each within 2% (absolute) / 5% (relative) of mergekit's.

    python benchmarks/mergekit_configs.py [--work DIR] [--only NAME,...] [--markdown table.md]

Prints a table: config, method, flexmerge's result (ran / refused: its sentence), max |diff|
against mergekit. A benchmark (minutes), not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from string import Template

import torch
import yaml

LAYERS = 5
VENV = Path.home() / ".cache" / "flexmerge" / "vs_mergekit" / "venv"
RANDOM_METHODS = ("dare_ties", "dare_linear", "della", "della_linear")
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Case:
    name: str
    source: str  # where in mergekit's repository it comes from
    text: str  # YAML with $base, $a, $b, $c, $tok_padded, $tok_chatml for the models
    tool: str = "mergekit-yaml"  # or mergekit-multi, mergekit-moe
    mergekit_fails: bool = False  # mergekit itself refuses it (a test of a bad parameter)


def _two_model(method: str, base: str | None = "$c", params: str = "", a: str = "$a", b: str = "$b",
               weights: tuple[float, float] = (0.6, 0.4)) -> str:
    """`two_model_config` of mergekit's test_basic_merges.py: weights 0.6 / 0.4, bfloat16."""
    text = f"merge_method: {method}\n" + (f"base_model: {base}\n" if base else "")
    text += (f"models:\n  - model: {a}\n    parameters: {{weight: {weights[0]}}}\n"
             f"  - model: {b}\n    parameters: {{weight: {weights[1]}}}\ndtype: bfloat16\n")
    return text + (f"parameters: {params}\n" if params else "")


def _tokenizer_case(models: list[str], extra: str = "", method: str = "linear", t: str = "") -> str:
    """`make_config` of mergekit's test_tokenizer.py: weight 1 each, float32, base_model the first."""
    listed = "".join(f"  - model: {m}\n    parameters: {{weight: 1.0}}\n" for m in models)
    return (f"merge_method: {method}\nbase_model: {models[0]}\nmodels:\n{listed}dtype: float32\n"
            f"parameters: {{{t}}}\n{extra}")


def _nuslerp_cases() -> list[Case]:
    out = []
    for base in (None, "$c"):
        for row_wise in (False, True):
            for flatten in (False, True):
                name = f"test_nuslerp_{'base' if base else 'nobase'}_row{int(row_wise)}_flat{int(flatten)}"
                params = f"{{nuslerp_row_wise: {str(row_wise).lower()}, nuslerp_flatten: {str(flatten).lower()}}}"
                out.append(Case(name, "tests/test_basic_merges.py::test_nuslerp_merges",
                                _two_model("nuslerp", base, params)))
    out.append(Case("test_nuslerp_zero_sum", "tests/test_basic_merges.py::test_nuslerp_merges",
                    _two_model("nuslerp", "$c", "{nuslerp_row_wise: false, nuslerp_flatten: false}",
                               weights=(-0.5, 0.5))))
    return out


L = LAYERS
CORPUS: list[Case] = [
    # mergekit/examples/*.yml: Hub models become local ones, layer ranges scaled to L layers
    Case("ex_arcee_fusion", "examples/arcee_fusion.yml",
         "models:\n  - model: $a\n  - model: $b\nmerge_method: arcee_fusion\nbase_model: $a\ndtype: bfloat16\n"),
    Case("ex_bio_merge", "examples/bio-merge.yml", textwrap.dedent("""\
        models:
          - model: $a
            parameters: {density: 0.5, weight: 0.5}
          - model: $b
            parameters: {density: 0.5, weight: 0.5}
        merge_method: ties
        base_model: $base
        parameters: {normalize: false, int8_mask: true}
        dtype: float16
        """)),
    Case("ex_gradient_slerp", "examples/gradient-slerp.yml", textwrap.dedent(f"""\
        slices:
          - sources:
              - model: $a
                layer_range: [0, {L}]
              - model: $b
                layer_range: [0, {L}]
        merge_method: slerp
        base_model: $a
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.5
        dtype: float16
        """)),
    Case("ex_linear", "examples/linear.yml", textwrap.dedent("""\
        models:
          - model: $a
            parameters: {weight: 1.0}
          - model: $b
            parameters: {weight: 0.3}
          - model: $c
            parameters: {weight: 0.5}
        merge_method: linear
        dtype: float16
        """)),
    Case("ex_orcamini_platy_44layer", "examples/orcamini-platy-44layer.yml", textwrap.dedent(f"""\
        slices:
          - sources:
            - model: $a
              layer_range: [0, {L * 3 // 5}]
          - sources:
            - model: $b
              layer_range: [{L // 2}, {L}]
        merge_method: passthrough
        dtype: float16
        """)),
    Case("ex_ties", "examples/ties.yml", textwrap.dedent("""\
        models:
          - model: $a
            parameters:
              density: [1, 0.7, 0.1]
              weight: 1.0
          - model: $b
            parameters:
              density: 0.5
              weight: [0, 0.3, 0.7, 1]
          - model: $c
            parameters:
              density: 0.33
              weight:
                - filter: mlp
                  value: 0.5
                - value: 0
        merge_method: ties
        base_model: $base
        parameters: {normalize: true, int8_mask: true}
        dtype: float16
        """)),
    # tests/test_basic_merges.py (model_a, model_b, model_c are the fixtures of the same names)
    Case("test_granite_copy", "tests/test_basic_merges.py::test_granite_copy",
         "merge_method: passthrough\nmodels:\n  - model: $a\ndtype: bfloat16\n"),
    Case("test_granite_linear", "tests/test_basic_merges.py::test_granite_linear_merge", textwrap.dedent("""\
        merge_method: linear
        models:
          - model: $a
            parameters: {weight: 0.6}
          - model: $b
            parameters: {weight: 0.4}
        dtype: bfloat16
        """)),
    Case("test_granite_slerp", "tests/test_basic_merges.py::test_granite_slerp",
         "merge_method: slerp\nbase_model: $a\nmodels:\n  - model: $a\n  - model: $b\nparameters: {t: 0.5}\n"
         "dtype: bfloat16\n"),
    Case("test_gpt2_copy", "tests/test_basic_merges.py::test_gpt2_copy",
         "merge_method: passthrough\nmodels:\n  - model: $a\ndtype: bfloat16\n"),
    Case("test_gpt2_stack", "tests/test_basic_merges.py::test_gpt2_stack",
         f"merge_method: passthrough\nslices:\n  - sources: [{{model: $a, layer_range: [0, {L}]}}]\n"
         f"  - sources: [{{model: $a, layer_range: [0, {L}]}}]\ndtype: bfloat16\n"),
    Case("test_passthrough_scale", "tests/test_basic_merges.py::test_passthrough_scale", textwrap.dedent("""\
        merge_method: passthrough
        models:
          - model: $a
            parameters:
              scale:
                - filter: o_proj
                  value: 0
                - value: 1
        """)),
    Case("test_linear", "tests/test_basic_merges.py::test_linear_merge", _two_model("linear", None)),
    Case("test_slerp", "tests/test_basic_merges.py::test_slerp_merge", _two_model("slerp", "$a", "{t: 0.35}")),
    *_nuslerp_cases(),
    Case("test_task_arithmetic", "tests/test_basic_merges.py::test_task_arithmetic_merge",
         _two_model("task_arithmetic")),
    Case("test_breadcrumbs", "tests/test_basic_merges.py::test_breadcrumbs_merge", _two_model("breadcrumbs")),
    Case("test_ties", "tests/test_basic_merges.py::test_ties_merge", _two_model("ties", params="{density: 0.3}")),
    Case("test_sce", "tests/test_basic_merges.py::test_sce_merge", _two_model("sce", params="{select_topk: 0.5}")),
    Case("test_ram", "tests/test_basic_merges.py::test_ram_merge", _two_model("ram")),
    Case("test_ramplus_tl", "tests/test_basic_merges.py::test_ramplus_tl_merge",
         _two_model("ramplus_tl", params="{r: 0.05, alpha: 1.0}")),
    Case("test_multislerp", "tests/test_basic_merges.py::test_multislerp_merge", _two_model("multislerp")),
    Case("test_dare_ties", "tests/test_basic_merges.py::test_dare_ties_merge",
         _two_model("dare_ties", params="{density: 0.66}")),
    Case("test_model_stock", "tests/test_basic_merges.py::test_model_stock_merge",
         _two_model("model_stock", "$a", a="$b", b="$c")),
    Case("test_model_stock_filterwise", "tests/test_basic_merges.py::test_model_stock_filterwise_merge",
         _two_model("model_stock", "$a", "{filter_wise: true}", a="$b", b="$c")),
    Case("test_arcee_fusion", "tests/test_basic_merges.py::test_arcee_fusion_merge",
         _two_model("arcee_fusion", "$a")),
    Case("test_nearswap", "tests/test_basic_merges.py::test_nearswap_merge",
         _two_model("nearswap", "$a", "{t: 0.0001}")),
    Case("test_della", "tests/test_basic_merges.py::test_della_merge",
         _two_model("della", params="{density: 0.66, epsilon: 0.05, lambda: 0.5}")),
    Case("test_della_invalid_epsilon", "tests/test_basic_merges.py::test_della_invalid_epsilon",
         _two_model("della", params="{density: 0.66, epsilon: 1.35, lambda: 0.5}"), mergekit_fails=True),
    Case("test_karcher", "tests/test_basic_merges.py::test_karcher_merge",
         _two_model("karcher", params="{max_iter: 5, tol: 1.0e-5}")),
    # tests/test_chat_template.py (model_base is `base`, with a tokenizer)
    Case("test_chat_template_chatml", "tests/test_chat_template.py::test_template_chatml",
         _two_model("linear", "$base", a="$base", b="$b", weights=(0.5, 0.5)) + "chat_template: chatml\n"),
    Case("test_chat_template_literal", "tests/test_chat_template.py::test_template_literal_jinja",
         _two_model("linear", "$base", a="$base", b="$b", weights=(0.5, 0.5))
         + "chat_template: \"{{messages[0]['content']}}\"\n"),
    # tests/test_tokenizer.py
    Case("test_tok_legacy", "tests/test_tokenizer.py::test_legacy_mode",  # 0.1.5: "Tensor size mismatch"
         _tokenizer_case(["$base", "$tok_padded", "$tok_chatml"]), mergekit_fails=True),
    Case("test_tok_source_base", "tests/test_tokenizer.py::test_source_base",
         _tokenizer_case(["$base", "$tok_padded", "$tok_chatml"], "tokenizer_source: base\n")),
    Case("test_tok_source_union", "tests/test_tokenizer.py::test_source_union",
         _tokenizer_case(["$base", "$tok_padded", "$tok_chatml"], "tokenizer_source: union\n")),
    Case("test_tok_source_model", "tests/test_tokenizer.py::test_source_model",
         _tokenizer_case(["$base", "$tok_padded", "$tok_chatml"], "tokenizer_source: $tok_chatml\n")),
    Case("test_tok_slerp_union", "tests/test_tokenizer.py::test_slerp_union",
         _tokenizer_case(["$base", "$tok_chatml"], "tokenizer_source: union\n", "slerp", "t: 0.5")),
    Case("test_tok_force_token", "tests/test_tokenizer.py::test_force_token",
         _tokenizer_case(["$base", "$tok_chatml"], textwrap.dedent("""\
             tokenizer:
               source: union
               tokens:
                 _tok_10: {source: $tok_chatml, force: true}
                 _tok_11: {source: $base, force: true}
             """))),
    Case("test_tok_model_token_id", "tests/test_tokenizer.py::test_model_token_id",
         _tokenizer_case(["$base", "$tok_chatml"], textwrap.dedent("""\
             tokenizer:
               source: base
               tokens:
                 _tok_20:
                   source: {kind: model_token, model: $tok_chatml, token_id: 64}
                   force: true
                 _tok_21:
                   source: {kind: model_token, model: $base, token: <s>}
                   force: true
             """))),
    Case("test_tok_pad_to_multiple_of", "tests/test_tokenizer.py::test_pad_to_multiple_of",
         _tokenizer_case(["$tok_chatml"], "tokenizer:\n  source: base\n  pad_to_multiple_of: 16\n")),
    # docs/multimerge.md: the example with a final merge
    Case("doc_multimerge", "docs/multimerge.md", textwrap.dedent("""\
        name: first-merge
        merge_method: linear
        models:
          - model: $base
          - model: $a
        parameters:
          weight: 0.5
        ---
        name: second-merge
        merge_method: slerp
        base_model: first-merge
        models:
          - model: $b
        parameters:
          t: 0.5
        ---
        merge_method: dare_ties
        base_model: $base
        models:
          - model: second-merge
            parameters:
              density: 0.6
              weight: 0.5
          - model: $c
            parameters:
              density: 0.8
              weight: 0.5
        """), tool="mergekit-multi"),
    # docs/moe.md: its two example configurations
    Case("doc_moe_upcycle", "docs/moe.md (sparse upcycling)",
         "base_model: $a\ngate_mode: random\ndtype: bfloat16\nexperts:\n"
         + "".join("  - source_model: $a\n" for _ in range(4)), tool="mergekit-moe"),
    Case("doc_moe_clown_car", "docs/moe.md (clown car)", textwrap.dedent("""\
        base_model: $a
        gate_mode: hidden
        dtype: bfloat16
        experts:
          - source_model: $a
            positive_prompts: ["<|im_start|>user\\nHello, who are you?<|im_end|>"]
          - source_model: $b
            positive_prompts: ["As a doctor of medicine,"]
          - source_model: $c
            positive_prompts: ["[Genres: Science Fiction]"]
        """), tool="mergekit-moe"),
    # registered methods no test exercises (docs/merge_methods.md)
    Case("method_dare_linear", "docs/merge_methods.md (dare_linear)",
         _two_model("dare_linear", params="{density: 0.66}")),
    Case("method_breadcrumbs_ties", "docs/merge_methods.md (breadcrumbs_ties)",
         _two_model("breadcrumbs_ties", params="{density: 0.9, gamma: 0.01}")),
    Case("method_della_linear", "docs/merge_methods.md (della_linear)",
         _two_model("della_linear", params="{density: 0.66, epsilon: 0.05, lambda: 0.5}")),
]


# ---------------------------------------------------------------------------------------------
# models


def _tokenizer(added: list[str]):
    """mergekit's test tokenizer (`make_tokenizer`): 64 BPE tokens <unk>, <s>, </s>, _tok_3...; `added` on top."""
    import tokenizers
    from transformers import LlamaTokenizerFast

    tokens = ["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, 64)]
    data = {"version": "1.0", "model": {"type": "BPE", "vocab": dict(zip(tokens, range(64))), "merges": []},
            "added_tokens": []}
    with tempfile.TemporaryDirectory() as d:
        tokenizers.Tokenizer.from_str(json.dumps(data)).save(f"{d}/tokenizer.json")
        tok = LlamaTokenizerFast(tokenizer_file=f"{d}/tokenizer.json")
    tok.add_tokens(added)
    return tok


def build_models(root: Path) -> dict[str, Path]:
    """The tiny Llama models (cached under `root`): name -> directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    names = ("base", "model_a", "model_b", "model_c", "tok_padded", "tok_chatml")
    dirs = {n: root / n for n in names}
    if all((d / "model.safetensors").exists() for d in dirs.values()):
        return dirs
    torch.manual_seed(0)
    cfg = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
               num_hidden_layers=LAYERS, tie_word_embeddings=False)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, **cfg))
    g = torch.Generator().manual_seed(1)

    def fine_tune(vocab: int) -> LlamaForCausalLM:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **cfg))
        state = {}
        for k, v in base.state_dict().items():
            grown = torch.cat([v, 0.02 * torch.randn(vocab - v.shape[0], *v.shape[1:], generator=g)]) \
                if v.shape[0] == 64 and vocab > 64 else v
            state[k] = grown + 0.004 * torch.randn(grown.shape, generator=g)
        model.load_state_dict(state)
        return model

    base.save_pretrained(dirs["base"])
    _tokenizer([]).save_pretrained(dirs["base"])
    for n in ("model_a", "model_b", "model_c"):
        fine_tune(64).save_pretrained(dirs[n])
    fine_tune(64).save_pretrained(dirs["tok_padded"])
    _tokenizer([f"<UNUSED_{i}>" for i in range(4)]).save_pretrained(dirs["tok_padded"])
    fine_tune(66).save_pretrained(dirs["tok_chatml"])
    _tokenizer(["<|im_start|>", "<|im_end|>"]).save_pretrained(dirs["tok_chatml"])
    return dirs


# ---------------------------------------------------------------------------------------------
# running


def config_text(case: Case, models: dict[str, Path]) -> str:
    """The case's YAML with the models' paths, every document's dtype and out_dtype float32."""
    text = Template(case.text).substitute(
        base=models["base"], a=models["model_a"], b=models["model_b"], c=models["model_c"],
        tok_padded=models["tok_padded"], tok_chatml=models["tok_chatml"])
    docs = []
    for doc in yaml.safe_load_all(text):
        for key in ("dtype", "out_dtype"):
            if key in doc:
                doc[key] = "float32"
        docs.append(yaml.safe_dump(doc, sort_keys=False))
    return "---\n".join(docs)


def method_of(case: Case) -> str:
    docs = list(yaml.safe_load_all(Template(case.text).safe_substitute()))
    if case.tool == "mergekit-moe":
        return f"moe ({docs[0].get('gate_mode', 'hidden')})"
    return " > ".join(str(d.get("merge_method")) for d in docs)


def run_mergekit(case: Case, config: Path, out: Path) -> str | None:
    """mergekit's output in `out` (kept while the config is unchanged); None, or its error."""
    stamp = out / ".config-sha256"
    digest = hashlib.sha256(config.read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return None
    shutil.rmtree(out, ignore_errors=True)
    exe = VENV / "bin" / case.tool
    if case.tool == "mergekit-multi":
        cmd = [str(exe), str(config), "--intermediate-dir", str(out.with_name(out.name + ".stages")),
               "--out-path", str(out), "--no-lazy"]
    else:
        cmd = [str(exe), str(config), str(out)]
    if case.tool != "mergekit-moe":
        cmd += ["--allow-crimes"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        last = [line for line in r.stderr.splitlines() if line.strip()]
        return last[-1] if last else f"exit {r.returncode}"
    stamp.write_text(digest)
    return None


def run_flexmerge(config: Path, out: Path) -> tuple[bool, str]:
    """(ran, its message): `flexmerge merge --config X --size 1`; a refusal is its one-line error."""
    cmd = [sys.executable, "-m", "flexmerge", "merge", "--config", str(config), "--size", "1", "--out", str(out),
           "--overwrite", "--no-resume"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "400"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode == 0:
        return True, " ".join(r.stdout.split())
    errors = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("error: ")]
    return False, " ".join((errors[-1] if errors else r.stderr or r.stdout).split()).removeprefix("error: ")


def export_all(artifact: Path) -> list[Path]:
    """Every task's export (HF directory) of a flexmerge artifact."""
    from flexmerge.flexmodel import export, load

    flex = load(artifact)
    outs = []
    for task in flex.tasks:
        target = artifact.with_name(f"{artifact.name}.export-{task}")
        export(flex, task, target, overwrite=True)
        outs.append(target)
    return outs


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update({k: v.float() for k, v in load_file(f).items()})
    return out


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> tuple[float | None, str]:
    """(max |ours − theirs| over all tensors, what differs in names or shapes)."""
    problems = []
    if ours.keys() != theirs.keys():
        problems.append(f"only flexmerge: {sorted(ours.keys() - theirs.keys())[:3]}, "
                        f"only mergekit: {sorted(theirs.keys() - ours.keys())[:3]}")
    shared = [k for k in ours.keys() & theirs.keys() if ours[k].shape == theirs[k].shape]
    shapes = sorted(k for k in ours.keys() & theirs.keys() if ours[k].shape != theirs[k].shape)
    if shapes:
        problems.append(f"shapes differ: {shapes[0]} {tuple(ours[shapes[0]].shape)} vs "
                        f"{tuple(theirs[shapes[0]].shape)}")
    worst = max(((ours[k] - theirs[k]).abs().max().item() for k in shared), default=None)
    return worst, "; ".join(problems)


def statistics(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(fraction of entries left at the base's value, L2 norm of the merged task vector)."""
    same = total = 0
    sq = 0.0
    for k, v in merged.items():
        if k in base and base[k].shape == v.shape:
            d = v - base[k]
            same += int((d == 0).sum())
            total += d.numel()
            sq += float((d.double() ** 2).sum())
    return same / max(total, 1), sq ** 0.5


def base_of(config: Path) -> Path | None:
    docs = list(yaml.safe_load_all(config.read_text()))
    base = docs[-1].get("base_model")
    return Path(base) if base else None


def survey(case: Case, models: dict[str, Path], work: Path) -> dict:
    config = work / "configs" / f"{case.name}.yml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(config_text(case, models))
    fm_out = work / "flexmerge" / case.name
    fm_out.parent.mkdir(parents=True, exist_ok=True)
    ran, message = run_flexmerge(config, fm_out)
    message = message.replace(f"{config}: ", "").replace(f"{work}/models/", "")  # the table names no local paths
    row = dict(config=case.name, source=case.source, method=method_of(case), ran=ran, message=message,
               diff=None, note="", equal=False)
    if case.mergekit_fails:  # a config mergekit refuses too: say so, with its reason
        failed = run_mergekit(case, config, work / "mergekit" / case.name)
        row["note"] = f"mergekit 0.1.5 refuses it too ({failed})" if failed else "mergekit runs it"
        return row
    if not ran:
        return row
    exports = export_all(fm_out)
    ours = tensors(exports[0])
    for other in exports[1:]:
        d, problem = compare(tensors(other), ours)
        if problem or d:
            row["note"] += f"task exports differ ({other.name}: {d}, {problem}); "
    mk_out = work / "mergekit" / case.name
    mk_out.parent.mkdir(parents=True, exist_ok=True)
    failed = run_mergekit(case, config, mk_out)
    if failed:
        row["note"] += f"mergekit failed: {failed}"
        return row
    theirs = tensors(mk_out)
    row["diff"], problem = compare(ours, theirs)
    row["note"] += problem
    if case.tool == "mergekit-multi":  # each earlier stage's output against mergekit-multi's intermediate one
        ours_dir, theirs_dir = (x.with_name(x.name + ".stages") for x in (fm_out, mk_out))
        for name in sorted(p.name for p in ours_dir.iterdir() if not p.name.startswith(".")):
            d, stage_problem = compare(tensors(ours_dir / name), tensors(theirs_dir / name))
            problem += stage_problem + ("" if d is not None and d <= 1e-5 else f"stage {name} differs; ")
            row["stages"] = row.get("stages", "") + f"; stage {name}: {d:.1e}"
    if any(m in RANDOM_METHODS for m in row["method"].split(" > ")) and (base := base_of(config)):
        b = tensors(base)
        (f0, n0), (f1, n1) = statistics(ours, b), statistics(theirs, b)
        row["stats"] = (f0, f1, n0 / n1)
        row["equal"] = not problem and abs(f0 - f1) <= 0.02 and abs(n0 / n1 - 1) <= 0.05
        row["note"] += f"at base: {f0:.3f} vs {f1:.3f}; norm ratio {n0 / n1:.3f}"
    else:
        row["equal"] = not problem and row["diff"] is not None and row["diff"] <= 1e-5
    return row


def table(rows: list[dict]) -> str:
    lines = ["| config | mergekit source | method | flexmerge at --size 1 | max \\|diff\\| vs mergekit |",
             "|---|---|---|---|---|"]
    for r in rows:
        result = "ran" if r["ran"] else f"refused: {r['message']}"
        if "stats" in r:
            f0, f1, ratio = r["stats"]
            diff = (f"random: {'statistics match' if r['equal'] else 'statistics DIFFER'} (left at base "
                    f"{f0:.3f} vs {f1:.3f}, norm ratio {ratio:.3f})")
        elif r["diff"] is not None:
            diff = f"{r['diff']:.1e}" + ("" if r["equal"] else " (DIFFERS)")
        else:
            diff = ""
        if r["note"] and "stats" not in r:
            diff += f"; {r['note']}" if diff else r["note"]
        diff += r.get("stages", "")
        lines.append(f"| {r['config']} | {r['source']} | {r['method']} | {result.replace('|', '/')} | {diff} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "flexmerge" / "mergekit_configs")
    ap.add_argument("--only", default=None, help="comma-separated config names")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    args = ap.parse_args(argv)
    if not (VENV / "bin" / "mergekit-yaml").exists():
        sys.exit(f"mergekit is not installed at {VENV}: run benchmarks/vs_mergekit.py once (it installs it)")
    models = build_models(args.work / "models")
    chosen = [c for c in CORPUS if args.only is None or c.name in args.only.split(",")]
    rows = []
    for case in chosen:
        row = survey(case, models, args.work)
        rows.append(row)
        status = "ran" if row["ran"] else "refused"
        print(f"{case.name:34s} {status:8s} {row['diff'] if row['diff'] is not None else '':<10} "
              f"{row['message'][:150] if not row['ran'] else row['note'][:150]}", flush=True)
    text = table(rows)
    ran = sum(r["ran"] for r in rows)
    equal = sum(r["equal"] for r in rows)
    summary = (f"{len(rows)} configs: {ran} run at --size 1, {equal} of them equal mergekit's tensors "
               f"(random methods: statistics); {len(rows) - ran} refused")
    print(text)
    print(summary)
    if args.markdown:
        args.markdown.write_text(text + "\n\n" + summary + "\n")


if __name__ == "__main__":
    main()
