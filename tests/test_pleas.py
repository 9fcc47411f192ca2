"""PLeaS: exactness at 2x, matching a permuted copy, the closed-form refit, schedules, outputs, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import flexmerge
from flexmerge.cli import app
from flexmerge.errors import CheckpointError, ConfigError
from flexmerge.pleas import modeling
from flexmerge.pleas.common import allowed_inputs, layout, recording
from flexmerge.pleas.lstsq import NormalEquations
from flexmerge.pleas.matching import Split, hungarian
from flexmerge.pleas.merge import correlations, original_model, pleas_merge
from flexmerge.pleas.schedule import greedy, size_of, uniform
from flexmerge.pleas.spec import residual_mlp_spec
from flexmerge.suites.calibration import validation_inputs

IN, WIDTH, HIDDEN, DEPTH, CLASSES = 6, 5, 7, 2, 3


def tiny(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A random residual MLP (non-trivial norms) and a head, as state dicts."""
    torch.manual_seed(seed)
    model = modeling.WideResidualMLP(IN, [WIDTH, 0], [[HIDDEN, 0]] * DEPTH)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    head = torch.nn.Linear(WIDTH, CLASSES)
    return model.state_dict(), head.state_dict()


def logits(state, head, x):
    model = modeling.WideResidualMLP(IN, [WIDTH, 0], [[HIDDEN, 0]] * DEPTH)
    model.load_state_dict(state)
    lin = torch.nn.Linear(WIDTH, CLASSES)
    lin.load_state_dict(head)
    with torch.no_grad():
        return lin(model(x))


def merged_logits(merged, task, x):
    with torch.no_grad():
        return merged.head(task)(merged.module()(x))


def permute(state, perms):
    """The same function with stream and hidden units reordered: new unit k = old unit perm[k]."""
    spec = residual_mlp_spec(state)
    out = dict(state)
    for g, axes in spec.groups.items():
        for key, axis in axes:
            out[key] = out[key].index_select(axis, perms[g])
    return out


@pytest.fixture
def calib():
    return torch.randn(400, IN, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("least_squares", [True, False])
@pytest.mark.parametrize("schedule", ["uniform", "greedy"])
def test_size_two_keeps_both_models_exactly(calib, least_squares, schedule):
    (sa, ha), (sb, hb) = tiny(0), tiny(1)
    merged = pleas_merge({"a": sa, "b": sb}, calib, 2.0, heads={"a": ha, "b": hb}, least_squares=least_squares,
                         schedule_name=schedule)
    assert merged.config["stream"] == [0, WIDTH] and merged.config["size"] == 2.0
    x = torch.randn(50, IN)
    torch.testing.assert_close(merged_logits(merged, "a", x), logits(sa, ha, x), atol=1e-5, rtol=0)
    torch.testing.assert_close(merged_logits(merged, "b", x), logits(sb, hb, x), atol=1e-5, rtol=0)


def test_permuted_copy_is_matched_back_to_identity(calib):
    sa, ha = tiny(0)
    gen = torch.Generator().manual_seed(3)
    perms = {"stream": torch.randperm(WIDTH, generator=gen),
             **{f"hidden.{i}": torch.randperm(HIDDEN, generator=gen) for i in range(DEPTH)}}
    sb = permute(sa, perms)
    hb = {"weight": ha["weight"][:, perms["stream"]], "bias": ha["bias"]}
    spec = residual_mlp_spec(sa)
    corr = correlations(spec, original_model(spec, sa), original_model(spec, sb), calib, 128)
    for g, c in corr.items():
        matched = hungarian(c)          # b's unit for each unit of a
        assert torch.equal(perms[g][matched], torch.arange(len(matched))), g  # b's unit k is a's perms[g][k]
    merged = pleas_merge({"a": sa, "b": sb}, calib, 1.0, heads={"a": ha, "b": hb}, least_squares=False)
    x = torch.randn(30, IN)
    torch.testing.assert_close(merged_logits(merged, "a", x), logits(sa, ha, x), atol=1e-5, rtol=0)
    torch.testing.assert_close(merged_logits(merged, "b", x), logits(sb, hb, x), atol=1e-5, rtol=0)


def test_masked_least_squares_equals_per_row_lstsq():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(90, 4, generator=gen, dtype=torch.float64), torch.randn(90, 3, generator=gen, dtype=torch.float64)
    allowed = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [1, 0, 1, 0]], dtype=torch.bool)
    eq = NormalEquations(4, 3)
    for xs, ys in zip(x.split(40), y.split(40)):  # streamed in three batches
        eq.add(xs, ys)
    w, b = eq.solve(allowed, ridge=0.0)
    for o in range(3):
        cols = allowed[o].nonzero().squeeze(1)
        design = torch.cat([x[:, cols], torch.ones(90, 1, dtype=torch.float64)], 1)
        sol = torch.linalg.lstsq(design, y[:, o:o + 1]).solution.squeeze(1)
        torch.testing.assert_close(w[o, cols], sol[:-1])
        torch.testing.assert_close(b[o], sol[-1])
        assert (w[o, ~allowed[o]] == 0).all()


def test_refit_respects_the_private_mask_and_fits_better(calib):
    (sa, ha), (sb, hb) = tiny(0), tiny(1)
    runs = {ls: pleas_merge({"a": sa, "b": sb}, calib, 1.5, heads={"a": ha, "b": hb}, least_squares=ls,
                            schedule_name="uniform") for ls in (True, False)}
    refit = runs[True]
    assert refit.config["refitted"]
    stream, hidden = refit.config["stream"], refit.config["hidden"][0]
    mask = allowed_inputs(*(Split(torch.arange(m + p), torch.arange(m + p), m) for m, p in (hidden, stream)), 0)
    assert (refit.state["layers.0.mlp.0.weight"][~mask] == 0).all()
    x = torch.randn(200, IN, generator=torch.Generator().manual_seed(9))
    err = {ls: sum(float((merged_logits(m, t, x) - logits(s, h, x)).pow(2).mean())
                   for t, s, h in (("a", sa, ha), ("b", sb, hb))) for ls, m in runs.items()}
    assert err[True] < err[False]


def test_schedules_meet_the_budget_and_greedy_unmerges_the_worst_first(calib):
    sa, _ = tiny(0)
    spec = residual_mlp_spec(sa)
    shapes = {k: tuple(v.shape) for k, v in sa.items()}
    assert uniform(spec, shapes, 1.0) == {g: 0 for g in spec.sizes}
    assert uniform(spec, shapes, 2.0) == spec.sizes
    sizes = [size_of(spec, shapes, uniform(spec, shapes, s)) for s in (1.2, 1.5, 1.8)]
    assert sizes == sorted(sizes) and all(s <= t + 1e-9 for s, t in zip(sizes, (1.2, 1.5, 1.8)))
    quality = {g: [1.0] * n for g, n in spec.sizes.items()}
    quality["hidden.1"] = [1.0] * (HIDDEN - 2) + [-0.5, -0.9]  # its two worst pairs match badly
    private = greedy(spec, shapes, 1.1, quality)
    assert private["hidden.1"] == 2 and sum(private.values()) == 2
    assert size_of(spec, shapes, private) <= 1.1


def test_output_loads_without_flexmerge(calib, tmp_path):
    (sa, ha), (sb, hb) = tiny(0), tiny(1)
    out = tmp_path / "merged"
    merged = flexmerge.pleas({"a": sa, "b": sb}, 1.5, calib, heads={"a": ha, "b": hb}, out=out)
    x = torch.randn(8, IN)
    save_file({"x": x, "a": merged_logits(merged, "a", x), "b": merged_logits(merged, "b", x)}, str(tmp_path / "io.st"))
    script = ("import sys; sys.path.insert(0, '.'); import modeling_pleas as m, torch\n"
              "from safetensors.torch import load_file\n"
              "assert 'flexmerge' not in sys.modules\n"
              "model, heads = m.load('.'); io = load_file('../io.st')\n"
              "with torch.no_grad():\n"
              "    for t in ('a', 'b'): assert torch.allclose(heads[t](model(io['x'])), io[t], atol=1e-6), t\n"
              "assert 'flexmerge' not in sys.modules\nprint('ok')\n")
    run = subprocess.run([sys.executable, "-I", "-c", script], cwd=out, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tasks"] == ["a", "b"] and 1.4 < cfg["size"] <= 1.5 and cfg["dense_size"] > cfg["size"]
    with pytest.raises(flexmerge.errors.FlexMergeError, match="exists"):
        flexmerge.pleas({"a": sa, "b": sb}, 1.5, calib, out=out)


def test_cli_end_to_end_and_errors(calib, tmp_path):
    (sa, ha), (sb, hb) = tiny(0), tiny(1)
    for name, st in {"a": sa, "b": sb, "ha": ha, "hb": hb}.items():
        save_file(st, str(tmp_path / f"{name}.safetensors"))
    save_file({"inputs": calib}, str(tmp_path / "calib.safetensors"))
    args = ["pleas", "--model", f"a={tmp_path / 'a.safetensors'}", "--model", f"b={tmp_path / 'b.safetensors'}",
            "--calibration", str(tmp_path / "calib.safetensors"), "--head", f"a={tmp_path / 'ha.safetensors'}",
            "--head", f"b={tmp_path / 'hb.safetensors'}"]
    res = CliRunner().invoke(app, [*args, "--size", "1.6", "--schedule", "uniform", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    model, heads = modeling.load(tmp_path / "o")
    assert set(heads) == {"a", "b"} and model.embed.weight.shape[0] > WIDTH
    for extra, message in ((["--size", "2.5"], "size must be in [1, 2]"),
                           (["--size", "1.5", "--schedule", "zigzag"], "unknown PLeaS schedule 'zigzag'"),
                           (["--size", "1.5", "--calibration", "nowhere"], "unknown suite 'nowhere'")):
        res = CliRunner().invoke(app, [*args, *extra, "--out", str(tmp_path / "bad")])
        assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "bad").exists()


def test_bad_inputs_are_clear_errors(calib):
    (sa, _), (sb, _) = tiny(0), tiny(1)
    with pytest.raises(ConfigError, match="exactly two models; got 3"):
        pleas_merge({"a": sa, "b": sb, "c": sa}, calib, 1.5)
    wider = {**sb, "embed.weight": torch.zeros(WIDTH, IN + 1)}
    with pytest.raises(CheckpointError, match=r"'embed.weight' is \(5, 6\) in 'a' but \(5, 7\) in 'b'"):
        pleas_merge({"a": sa, "b": wider}, calib, 1.5)
    with pytest.raises(ConfigError, match=r"\(N, 6\) tensor; got \(10, 3\)"):
        pleas_merge({"a": sa, "b": sb}, torch.randn(10, 3), 1.5)
    conv = {"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(2, 4)}
    with pytest.raises(ConfigError, match="no PLeaS permutation spec fits.*needs embed.weight.*conv1.weight"):
        pleas_merge({"a": conv, "b": conv}, calib, 1.5)
    with pytest.raises(ConfigError, match="does not know how to permute: head.weight"):
        pleas_merge({"a": {**sa, "head.weight": torch.zeros(2, WIDTH)}, "b": {**sb, "head.weight": torch.zeros(2, WIDTH)}},
                    calib, 1.5)
    with pytest.raises(ConfigError, match="unknown PLeaS matching 'zipit'"):
        pleas_merge({"a": sa, "b": sb}, calib, 1.5, matching="zipit")


def test_digits_suite_validation_inputs_calibrate():
    pytest.importorskip("sklearn")
    x = validation_inputs("digits", ["rot90", "transpose"])
    assert x.shape[1] == 64 and x.shape[0] > 100 and x.dtype == torch.float32
    assert torch.equal(validation_inputs("digits", ["a", "b"]), validation_inputs("digits"))  # no such tasks: all
    with pytest.raises(ConfigError, match="suite 'wordnet' has no tensor inputs to calibrate on"):
        validation_inputs("wordnet")


def test_the_library_takes_calibration_from_its_caller(calib):
    """No suite lookup in flexmerge.pleas: a tensor, a file, or a loader called with the models' names."""
    (sa, _), (sb, _) = tiny(0), tiny(1)
    asked = []
    merged = flexmerge.pleas({"a": sa, "b": sb}, 1.2, lambda tasks: asked.append(tasks) or calib)
    assert asked == [["a", "b"]] and merged.config["calibration_samples"] == len(calib)
    with pytest.raises(ConfigError, match="calibration 'digits' is not a file; give a tensor"):
        flexmerge.pleas({"a": sa, "b": sb}, 1.2, "digits")
    script = "import sys, flexmerge.pleas; assert not [m for m in sys.modules if m.startswith('flexmerge.suites')]"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_cli_calibrates_on_a_suite_by_name(tmp_path):
    """`--calibration digits`: the suite's validation inputs of the tasks named like the models."""
    pytest.importorskip("sklearn")
    from flexmerge.suites.digits import DigitsNet

    for name, seed in (("rot90", 0), ("transpose", 1)):
        torch.manual_seed(seed)
        save_file(DigitsNet().state_dict(), str(tmp_path / f"{name}.safetensors"))
    args = ["pleas", "--model", f"rot90={tmp_path / 'rot90.safetensors'}", "--model",
            f"transpose={tmp_path / 'transpose.safetensors'}", "--size", "1.2"]
    res = CliRunner().invoke(app, [*args, "--calibration", "digits", "--out", str(tmp_path / "o")])
    n = len(validation_inputs("digits", ["rot90", "transpose"]))
    assert res.exit_code == 0 and f"activation matching ({n} calibration inputs)" in res.output, res.output
    res = CliRunner().invoke(app, [*args, "--calibration", "no/such.safetensors", "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "'no/such.safetensors' is neither a file nor a suite name" in res.output, res.output


def test_weight_matching_finds_a_permuted_copy_without_data(tmp_path):
    sa, ha = tiny(0)
    gen = torch.Generator().manual_seed(4)
    perms = {"stream": torch.randperm(WIDTH, generator=gen),
             **{f"hidden.{i}": torch.randperm(HIDDEN, generator=gen) for i in range(DEPTH)}}
    sb = permute(sa, perms)
    hb = {"weight": ha["weight"][:, perms["stream"]], "bias": ha["bias"]}
    merged = flexmerge.pleas({"a": sa, "b": sb}, 1.0, heads={"a": ha, "b": hb})  # no calibration
    cfg = merged.config
    assert cfg["matching"] == "weights" and not cfg["least_squares"] and cfg["calibration_samples"] == 0
    for g, perm in perms.items():  # b's unit matched to a's unit i is the one a's unit i was moved to
        assert torch.equal(perm[torch.tensor(cfg["permutations"][g]["b"])], torch.tensor(cfg["permutations"][g]["a"])), g
    x = torch.randn(30, IN)
    torch.testing.assert_close(merged_logits(merged, "a", x), logits(sa, ha, x), atol=1e-5, rtol=0)
    torch.testing.assert_close(merged_logits(merged, "b", x), logits(sb, hb, x), atol=1e-5, rtol=0)
    for k in ("a", "b", "ha", "hb"):
        save_file({"a": sa, "b": sb, "ha": ha, "hb": hb}[k], str(tmp_path / f"{k}.safetensors"))
    res = CliRunner().invoke(app, ["pleas", "--model", f"a={tmp_path / 'a.safetensors'}", "--model",
                                   f"b={tmp_path / 'b.safetensors'}", "--size", "1.3", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0 and "weights matching (no calibration data)" in res.output, res.output
    with pytest.raises(ConfigError, match="least-squares refit needs calibration inputs"):
        flexmerge.pleas({"a": sa, "b": sb}, 1.5, least_squares=True)


# ---- BERT-style encoders -----------------------------------------------------------------------------

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"the a cat dog sat ran on mat fast slow red big".split()]
HEADS, HEAD_DIM, INTER, LAYERS = 2, 4, 12, 2


def tiny_bert(seed: int):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=HEADS * HEAD_DIM, num_hidden_layers=LAYERS,
                                  num_attention_heads=HEADS, intermediate_size=INTER, max_position_embeddings=32,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg).eval()


def bert_tokens(n: int = 24, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(WORDS), (n, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[::3, 5:] = 0  # some padded inputs
    return {"input_ids": ids, "attention_mask": mask}


def bert_out(model, tokens):
    with torch.no_grad():
        return model(**tokens).last_hidden_state


def permuted_bert(model, seed: int = 5):
    """The same function: heads, within-head Q/K dims and V/O dims, and intermediate units reordered."""
    import copy

    gen = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    sd = out.state_dict()
    perms = {}
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        heads = torch.randperm(HEADS, generator=gen)
        qk = torch.cat([int(h) * HEAD_DIM + torch.randperm(HEAD_DIM, generator=gen) for h in heads])
        vo = torch.cat([int(h) * HEAD_DIM + torch.randperm(HEAD_DIM, generator=gen) for h in heads])
        inter = torch.randperm(INTER, generator=gen)
        perms[i] = (heads, inter)
        for name, order in (("attention.self.query", qk), ("attention.self.key", qk),
                            ("attention.self.value", vo), ("intermediate.dense", inter)):
            sd[p + name + ".weight"], sd[p + name + ".bias"] = sd[p + name + ".weight"][order], sd[p + name + ".bias"][order]
        sd[p + "attention.output.dense.weight"] = sd[p + "attention.output.dense.weight"][:, vo]
        sd[p + "output.dense.weight"] = sd[p + "output.dense.weight"][:, inter]
    out.load_state_dict(sd)
    return out, perms


@pytest.mark.parametrize("matching", ["activation", "weights"])
def test_bert_permuted_copy_is_matched_back_exactly(matching):
    a = tiny_bert(0)
    b, perms = permuted_bert(a)
    tokens = bert_tokens()
    for size in (1.0, 2.0):  # 1: every unit merged with its true partner; 2: every unit private
        merged = flexmerge.pleas({"a": a, "b": b}, size, tokens if matching == "activation" else None,
                                 matching=matching, least_squares=False)
        cfg = merged.config
        assert cfg["matching"] == matching and cfg["hf_config"]["num_attention_heads"] == HEADS
        for i, (heads, inter) in perms.items():
            assert torch.equal(heads[torch.tensor(cfg["permutations"][f"heads.{i}"]["b"])], torch.arange(HEADS))
            a_order, b_order = (torch.tensor(cfg["permutations"][f"inter.{i}"][t]) for t in "ab")
            assert torch.equal(inter[b_order], a_order)
        torch.testing.assert_close(bert_out(merged.module(), tokens), bert_out(a, tokens), atol=1e-5, rtol=0)
    assert cfg["intermediate"] == [[0, INTER]] * LAYERS and cfg["hf_config"]["intermediate_size"] == 2 * INTER


def test_bert_no_merged_units_is_both_models_mlps_side_by_side():
    """At S = 2 no intermediate unit is merged: each layer's MLP is exactly the mean of both models' MLPs
    (the shared stream makes the mean the only exact target; see docs/pleas.md)."""
    a, b = tiny_bert(0), tiny_bert(1)
    merged = flexmerge.pleas({"a": a, "b": b}, 2.0, bert_tokens(), least_squares=False).module()
    h = torch.randn(3, 5, HEADS * HEAD_DIM)
    mlp = lambda m, i: m.encoder.layer[i].output.dense(m.encoder.layer[i].intermediate(h))  # noqa: E731
    with torch.no_grad():
        for i in range(LAYERS):
            torch.testing.assert_close(mlp(merged, i), (mlp(a, i) + mlp(b, i)) / 2, atol=1e-6, rtol=0)


def test_bert_refit_checkpoint_loads_with_plain_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    a, b = tiny_bert(0), tiny_bert(1)
    tokens = bert_tokens()
    runs = {ls: flexmerge.pleas({"a": a, "b": b}, 1.4, tokens, least_squares=ls, out=tmp_path / f"o{ls}")
            for ls in (True, False)}
    merged = runs[True]
    cfg = merged.config
    widths = [m + 2 * p for m, p in cfg["intermediate"]]
    assert 1.0 < cfg["size"] <= 1.4 and cfg["refitted"] and cfg["hf_config"]["intermediate_size"] == max(widths)
    for i, w in enumerate(widths):  # zero padding where a layer is narrower
        assert (merged.state[f"encoder.layer.{i}.intermediate.dense.weight"][w:] == 0).all()
        assert (merged.state[f"encoder.layer.{i}.output.dense.weight"][:, w:] == 0).all()
    loaded = transformers.AutoModel.from_pretrained(str(tmp_path / "oTrue")).eval()
    assert type(loaded).__name__ == "BertModel" and loaded.config.intermediate_size == max(widths)
    torch.testing.assert_close(bert_out(loaded, tokens), bert_out(merged.module(), tokens), atol=1e-6, rtol=0)
    # the refit lowers the layer-wise objective: layer 0's intermediate.dense against both models' own features
    name = "encoder.layer.0.intermediate.dense"
    with recording(a, {name}) as fa, recording(b, {name}) as fb, torch.no_grad():
        a(**tokens), b(**tokens)
    keep = tokens["attention_mask"].bool()
    (xa, ya), (xb, yb) = fa[name], fb[name]
    perm = cfg["permutations"]["inter.0"]
    s = Split(torch.tensor(perm["a"]), torch.tensor(perm["b"]), cfg["intermediate"][0][0])
    x, y = (xa[keep] + xb[keep]) / 2, layout(ya[keep], yb[keep], -1, s)
    err = {ls: float((x @ m.state[name + ".weight"][:s.width].T + m.state[name + ".bias"][:s.width] - y).pow(2).mean())
           for ls, m in runs.items()}
    assert err[True] < 0.9 * err[False], err
    assert json.loads((tmp_path / "oTrue" / "pleas.json").read_text())["matching"] == "activation"


def test_bert_cli_with_text_calibration_and_unsupported_architectures(tmp_path):
    transformers = pytest.importorskip("transformers")
    for name, seed in (("a", 0), ("b", 1)):
        tiny_bert(seed).save_pretrained(tmp_path / name)
        transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(tmp_path / name)
    (tmp_path / "calib.txt").write_text("the cat sat on the mat\na big red dog ran fast\nthe dog sat\n")
    args = ["pleas", "--model", f"a={tmp_path / 'a'}", "--model", f"b={tmp_path / 'b'}", "--size", "1.5"]
    res = CliRunner().invoke(app, [*args, "--calibration", str(tmp_path / "calib.txt"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0 and "activation matching (3 calibration inputs)" in res.output, res.output
    loaded, tok = (cls.from_pretrained(str(tmp_path / "o")) for cls in (transformers.AutoModel, transformers.AutoTokenizer))
    assert loaded.config.intermediate_size > INTER and tok("the cat")["input_ids"][1] == WORDS.index("the")
    gpt = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20, n_positions=8))
    with pytest.raises(ConfigError, match=r"GPT2Config: the bert spec needs encoder\.layer\.0\.attention\.self\.query"):
        flexmerge.pleas({"a": gpt, "b": gpt}, 1.5)
    res = CliRunner().invoke(app, [*args, "--calibration", str(tmp_path / "o" / "config.json"), "--out",
                                   str(tmp_path / "bad")])
    assert res.exit_code == 2 and "give a .safetensors file" in res.output and not (tmp_path / "bad").exists()
    res = CliRunner().invoke(app, [*args, "--calibration", "digits", "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "BERT calibration 'digits' is not a file" in res.output, res.output  # no suite lookup
