"""PLeaS on the fashion suite's CNN (FashionNet: GroupNorm residual convs), on 12x12 inputs to stay fast."""

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
from flexmerge.errors import ConfigError
from flexmerge.pleas.matching import hungarian
from flexmerge.pleas.merge import correlations, original_model, pleas_merge
from flexmerge.pleas.spec import CNN_NORM_GROUPS, fashion_cnn_spec
from flexmerge.suites.fashion import FEATURES, FashionNet

CLASSES = 5


def tiny(seed: int) -> tuple[FashionNet, torch.nn.Linear]:
    """A random FashionNet (norms perturbed away from 1/0) and a head."""
    torch.manual_seed(seed)
    model = FashionNet()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval(), torch.nn.Linear(FEATURES, CLASSES).eval()


def states(*nets):
    return [{k: v.detach().clone() for k, v in n.state_dict().items()} for n in nets]


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 1, 12, 12, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def outputs(merged, task, x):
    return merged.head(task)(merged.module()(x))


@pytest.fixture
def calib():
    return images(48, 1)


def group_perm(n: int, gen: torch.Generator) -> torch.Tensor:
    """A permutation of n channels that keeps GroupNorm groups whole: groups shuffled, then channels within."""
    size = n // CNN_NORM_GROUPS
    groups = torch.randperm(CNN_NORM_GROUPS, generator=gen)
    return torch.cat([int(g) * size + torch.randperm(size, generator=gen) for g in groups])


def permute(state, perms):
    """The same function with units reordered (new unit k = old unit perm[k]), through the spec's views."""
    spec = fashion_cnn_spec(state)
    out = spec.viewed(dict(state))
    for g, axes in spec.groups.items():
        for key, axis in axes:
            out[key] = out[key].index_select(axis, perms[g])
    return {k: spec.stored(k, v) for k, v in out.items()}


@pytest.mark.parametrize("least_squares", [True, False])
def test_size_two_keeps_both_cnns_exactly(calib, least_squares):
    (a, ha), (b, hb) = tiny(0), tiny(1)
    sa, sb, sha, shb = states(a, b, ha, hb)
    merged = pleas_merge({"a": sa, "b": sb}, calib, 2.0, heads={"a": sha, "b": shb}, least_squares=least_squares)
    assert merged.config["architecture"] == "pleas-fashion-cnn" and merged.config["size"] == 2.0
    assert merged.config["stages"] == [[0, 16], [0, 32]] and merged.config["features"] == [0, FEATURES]
    x = images(20, 5)
    with torch.no_grad():
        torch.testing.assert_close(outputs(merged, "a", x), ha(a(x)), atol=1e-5, rtol=0)
        torch.testing.assert_close(outputs(merged, "b", x), hb(b(x)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("matching", ["activation", "weights"])
def test_permuted_cnn_copy_is_matched_back_in_whole_groups(calib, matching):
    (a, ha), = [tiny(0)]
    sa, sha = states(a, ha)
    gen = torch.Generator().manual_seed(3)
    perms = {"stage.0": group_perm(16, gen), "stage.1": group_perm(32, gen), "features": torch.randperm(FEATURES, generator=gen)}
    sb = permute(sa, perms)
    shb = {"weight": sha["weight"][:, perms["features"]], "bias": sha["bias"]}
    if matching == "activation":
        spec = fashion_cnn_spec(sa)
        corr = correlations(spec, original_model(spec, sa), original_model(spec, sb), calib, 16)
        for g, c in corr.items():
            assert torch.equal(perms[g][hungarian(c)], torch.arange(c.shape[0])), g
    merged = pleas_merge({"a": sa, "b": sb}, calib if matching == "activation" else None, 1.0,
                         heads={"a": sha, "b": shb}, least_squares=False, matching=matching)
    for g, p in perms.items():  # b's unit matched to each of a's units, in the merged layout
        orders = merged.config["permutations"][g]
        assert torch.equal(p[torch.tensor(orders["b"])], torch.tensor(orders["a"])), g
    x = images(20, 6)
    with torch.no_grad():
        torch.testing.assert_close(outputs(merged, "a", x), ha(a(x)), atol=1e-5, rtol=0)


def patches(x: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """(N x positions, C x k x k) patches, by explicit slicing (independent of unfold)."""
    x = torch.nn.functional.pad(x, (padding,) * 4)
    side = (x.shape[-1] - kernel) // stride + 1
    rows = [x[:, :, i * stride:i * stride + kernel, j * stride:j * stride + kernel].reshape(x.shape[0], -1)
            for i in range(side) for j in range(side)]
    return torch.stack(rows, 1).reshape(-1, rows[0].shape[1])


def test_conv_refit_equals_an_independent_least_squares_solution(calib):
    (a, _), (b, _) = tiny(0), tiny(1)
    sa, sb = states(a, b)
    merged = pleas_merge({"a": sa, "b": sb}, calib, 1.0, ridge=0.0)
    orders = {g: (torch.tensor(o["a"]), torch.tensor(o["b"])) for g, o in merged.config["permutations"].items()}
    seen = {}
    hooks = [m.layers[1].conv.register_forward_hook(lambda mod, i, o, m=m: seen.__setitem__(m, (i[0], o))) for m in (a, b)]
    with torch.no_grad():
        a(calib), b(calib)
    for h in hooks:
        h.remove()
    (xa, ya), (xb, yb) = seen[a], seen[b]
    oa, ob = orders["stage.0"]
    x = (xa[:, oa] + xb[:, ob]) / 2                       # merged inputs: the mean of both models' (permuted)
    y = (ya[:, oa] + yb[:, ob]) / 2
    design = torch.cat([patches(x, 3, 1, 1), torch.ones(x.shape[0] * 36, 1)], 1).double()
    target = y.movedim(1, -1).reshape(-1, y.shape[1]).double()
    sol = torch.linalg.lstsq(design, target).solution
    w, bias = merged.state["layers.1.conv.weight"], merged.state["layers.1.conv.bias"]
    torch.testing.assert_close(w.reshape(w.shape[0], -1).double(), sol[:-1].T, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(bias.double(), sol[-1], atol=2e-4, rtol=1e-3)


def test_partial_merge_keeps_groups_whole_and_masks_private_channels(calib):
    (a, ha), (b, hb) = tiny(0), tiny(1)
    sa, sb, sha, shb = states(a, b, ha, hb)
    runs = {ls: pleas_merge({"a": sa, "b": sb}, calib, 1.5, heads={"a": sha, "b": shb}, least_squares=ls)
            for ls in (True, False)}
    cfg = runs[True].config
    assert 1.4 < cfg["size"] <= 1.5
    for (m, p), size in zip(cfg["stages"], cfg["group_sizes"]):
        assert m % size == 0 and p % size == 0 and m + p in (16, 32)
    (m0, p0), (m1, p1) = cfg["stages"]
    w = runs[True].state["layers.3.conv.weight"]      # stage.1 -> stage.1: a's private rows never read b's
    assert w.shape[:2] == (m1 + 2 * p1, m1 + 2 * p1)
    if p1:
        assert (w[m1:m1 + p1, m1 + p1:] == 0).all() and (w[m1 + p1:, m1:m1 + p1] == 0).all()
    x = images(40, 9)
    with torch.no_grad():
        err = {ls: sum(float((outputs(r, t, x) - h(n(x))).pow(2).mean()) for t, n, h in (("a", a, ha), ("b", b, hb)))
               for ls, r in runs.items()}
    assert err[True] < err[False]


def test_cnn_output_loads_without_flexmerge_and_cli_runs(calib, tmp_path):
    (a, ha), (b, hb) = tiny(0), tiny(1)
    for name, st in zip(("a", "b", "ha", "hb"), states(a, b, ha, hb)):
        save_file(st, str(tmp_path / f"{name}.safetensors"))
    save_file({"inputs": calib}, str(tmp_path / "calib.safetensors"))
    out = tmp_path / "merged"
    res = CliRunner().invoke(app, ["pleas", "--model", f"a={tmp_path / 'a.safetensors'}", "--model",
                                   f"b={tmp_path / 'b.safetensors'}", "--calibration", str(tmp_path / "calib.safetensors"),
                                   "--head", f"a={tmp_path / 'ha.safetensors'}", "--head", f"b={tmp_path / 'hb.safetensors'}",
                                   "--size", "1.3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "stage.0" in res.output and "7 layers refit" in res.output
    merged = flexmerge.pleas({"a": tmp_path / "a.safetensors", "b": tmp_path / "b.safetensors"}, 1.3,
                             tmp_path / "calib.safetensors", heads={"a": tmp_path / "ha.safetensors",
                                                                     "b": tmp_path / "hb.safetensors"})
    x = images(6, 11)
    save_file({"x": x, "a": outputs(merged, "a", x), "b": outputs(merged, "b", x)}, str(tmp_path / "io.st"))
    script = ("import sys; sys.path.insert(0, '.'); import modeling_pleas as m, torch\n"
              "from safetensors.torch import load_file\n"
              "model, heads = m.load('.'); io = load_file('../io.st')\n"
              "with torch.no_grad():\n"
              "    for t in ('a', 'b'): assert torch.allclose(heads[t](model(io['x'])), io[t], atol=1e-6), t\n"
              "assert 'flexmerge' not in sys.modules and type(model).__name__ == 'WideConvNet'\nprint('ok')\n")
    run = subprocess.run([sys.executable, "-I", "-c", script], cwd=out, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "pleas-fashion-cnn" and 1.2 < cfg["size"] <= 1.3


def test_cnn_bad_inputs_are_clear_errors(calib):
    (a, _), (b, _) = tiny(0), tiny(1)
    sa, sb = states(a, b)
    with pytest.raises(ConfigError, match=r"\(N, 1, ·, ·\) tensor; got \(4, 12, 12\)"):
        pleas_merge({"a": sa, "b": sb}, torch.rand(4, 12, 12), 1.5)
    no_norm = {k: v for k, v in sa.items() if not k.startswith("final_norm")}
    with pytest.raises(ConfigError, match="fashion-cnn spec needs final_norm.weight, final_norm.bias"):
        pleas_merge({"a": no_norm, "b": no_norm}, calib, 1.5)
    odd = {**sa, "stem.weight": torch.zeros(18, 1, 4, 4)}
    with pytest.raises(ConfigError, match="18 channels do not split into 4 GroupNorm groups"):
        fashion_cnn_spec(odd)
    with pytest.raises(ConfigError, match="does not know how to permute: head.weight"):
        fashion_cnn_spec({**sa, "head.weight": torch.zeros(2, FEATURES)})
    with pytest.raises(ConfigError, match=r"layers.0.conv.weight is \(16, 16, 5, 5\), the pattern needs \(16, 16, 3, 3\)"):
        fashion_cnn_spec({**sa, "layers.0.conv.weight": torch.zeros(16, 16, 5, 5)})


def test_fashion_suite_validation_images_calibrate():
    from flexmerge.suites.fashion import FashionSuite

    reason = FashionSuite().unavailable_reason()
    if reason:
        pytest.skip(reason)
    from flexmerge.suites.calibration import validation_inputs

    x = validation_inputs("fashion", ["rot90", "digits"])
    assert x.shape[1:] == (1, 28, 28) and x.shape[0] > 500 and x.dtype == torch.float32


def test_the_suites_networks_are_the_library_classes_with_their_keys():
    """Each network is defined once (flexmerge.pleas.modeling); the suites' keys, and so cached zoos, are as before."""
    from flexmerge.pleas import modeling
    from flexmerge.suites.digits import DigitsNet

    fashion, digits = FashionNet(), DigitsNet()
    assert isinstance(fashion, modeling.WideConvNet) and isinstance(digits, modeling.WideResidualMLP)
    assert type(fashion.final_norm) is type(digits.layers[0].norm) is torch.nn.LayerNorm  # what they trained with
    assert list(fashion.state_dict()) == ["stem.weight", "stem.bias", *[f"layers.{i}.{p}.{t}" for i in range(5)
                                          for p in ("norm", "conv") for t in ("weight", "bias")],
                                          "proj.weight", "proj.bias", "final_norm.weight", "final_norm.bias"]
    assert list(digits.state_dict()) == ["embed.weight", "embed.bias", *[f"layers.{i}.{p}.{t}" for i in range(3)
                                         for p in ("norm", "mlp.0", "mlp.2") for t in ("weight", "bias")],
                                         "final_norm.weight", "final_norm.bias"]
    assert [c.conv.stride for c in fashion.layers] == [(1, 1), (1, 1), (2, 2), (1, 1), (1, 1)]
