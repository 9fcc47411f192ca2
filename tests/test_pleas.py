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
from flexmerge.pleas.lstsq import NormalEquations
from flexmerge.pleas.matching import Split, hungarian
from flexmerge.pleas.merge import allowed_inputs, correlations, original_model, pleas_merge
from flexmerge.pleas.schedule import greedy, size_of, uniform
from flexmerge.pleas.spec import residual_mlp_spec

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
    from flexmerge.pleas import calibration_inputs

    x = calibration_inputs("digits", ["rot90", "transpose"])
    assert x.shape[1] == 64 and x.shape[0] > 100 and x.dtype == torch.float32


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
