"""mergekit's merge methods and per-model weights as flexmerge methods: each deterministic method's
1x merge equals mergekit's formula, written here from `mergekit/merge_methods/*.py` (0.1.5) on the
tiny zoo; random ones match its statistics; every method merges any group, so every size works."""

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
from flexmerge.errors import ConfigError

runner = CliRunner()
WEIGHTS = {"task0": 0.3, "task1": 1.0, "task2": 0.6}


def _models(zoo, n: int = 3) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], dict[str, Path]]:
    base, models = zoo
    models = dict(list(models.items())[:n])
    return load_file(base), [load_file(p) for p in models.values()], models


def _merged(zoo, method: str, params: dict, n: int = 3, size: float = 1, task: str = "task0",
            **load) -> dict[str, torch.Tensor]:
    """Task `task`'s weights in flexmerge's merge at `size` (1x: the one merged model)."""
    base, models = zoo
    tasks = flexmerge.load_tasks(base, dict(list(models.items())[:n]), **load)
    return flexmerge.merge(tasks, size=size, method=method, params=params).state_dict(task)


def _assert_each_tensor(got: dict[str, torch.Tensor], expected, base: dict[str, torch.Tensor], tol: float = 2e-6):
    """Every merged tensor (the frozen embedding aside) is `expected(key)`."""
    for key in base:
        if key == "embed.weight":
            continue
        torch.testing.assert_close(got[key], expected(key), rtol=tol, atol=tol, msg=key)


# --- per-model weights -----------------------------------------------------------------------------------


def _gta(deltas: torch.Tensor, weights: list[float], consensus: bool, normalize: bool, lam: float) -> torch.Tensor:
    """mergekit's GeneralizedTaskArithmeticMerge.merge_group after sparsification (delta only)."""
    w = torch.tensor(weights).view(-1, *[1] * (deltas.dim() - 1))
    deltas = deltas * w
    if consensus:
        sign = deltas.sign()
        majority = (deltas.sum(0) >= 0).float() * 2 - 1
        mask = (sign == majority).float()
        mixed, divisor = (deltas * mask).sum(0), (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = deltas.sum(0), w.sum(0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return mixed * lam if lam != 1 else mixed


@pytest.mark.parametrize("method, params, consensus, normalize, lam", [
    ("task_arithmetic", {"convention": "sum", "lam": 1.3}, False, False, 1.3),
    ("task_arithmetic", {"convention": "mean", "lam": 0.9}, False, True, 0.9),
    ("ties", {"keep": 1.0, "combine": "mean", "lam": 0.8}, True, True, 0.8),
    ("ties", {"keep": 1.0, "combine": "sum", "lam": 1.0}, True, False, 1.0),
])
def test_per_task_weights_at_1x_are_mergekits_weighted_merge(zoo, method, params, consensus, normalize, lam):
    theta0, thetas, _ = _models(zoo)
    got = _merged(zoo, method, {**params, "weights": WEIGHTS})
    _assert_each_tensor(got, lambda k: theta0[k] + _gta(torch.stack([t[k] - theta0[k] for t in thetas]),
                                                        list(WEIGHTS.values()), consensus, normalize, lam), theta0)


def test_a_group_keeps_its_members_weights_normalized_over_the_group(zoo):
    """At a size between 1x and Mx, a block merged for some tasks only is their weighted mean."""
    base, models = zoo
    tasks = flexmerge.load_tasks(base, dict(list(models.items())[:3]))
    params = {"convention": "mean", "lam": 1.0, "weights": WEIGHTS}
    fm = flexmerge.merge(tasks, size=2, method="task_arithmetic", params=params)
    theta0 = load_file(base)
    thetas = {n: load_file(p) for n, p in models.items()}
    seen = set()
    for b, groups in enumerate(fm.assignment.groups):
        for g in groups:
            names = [tasks.names[t] for t in g]
            key = fm.partition.blocks[b].parts[0].key
            w = torch.tensor([WEIGHTS[n] for n in names]).view(-1, *[1] * theta0[key].dim())
            taus = torch.stack([thetas[n][key] - theta0[key] for n in names])
            expected = theta0[key] + (taus * w).sum(0) / w.sum()
            torch.testing.assert_close(fm.state_dict(names[0])[key], expected, rtol=2e-6, atol=2e-6)
            seen.add(len(g))
    assert 2 in seen  # a group of two was checked, not only copies and the all-task group
    assert fm.method["weights"] == WEIGHTS  # the artifact describes itself


def test_weights_reach_the_planner_of_a_linear_method(zoo):
    """Merged-vector planning scores a group by its weighted merge: weights change the path."""
    base, models = zoo
    tasks = flexmerge.load_tasks(base, models)
    plain = flexmerge.plan(tasks, method="task_arithmetic", mode="merged")
    weighted = flexmerge.plan(tasks, method="task_arithmetic", mode="merged",
                              params={"weights": {"task0": 50.0, "task3": 0.01}})
    assert [s.similarity for s in plain.steps] != [s.similarity for s in weighted.steps]


def test_weights_are_refused_where_they_cannot_apply(zoo):
    base, models = zoo
    tasks = flexmerge.load_tasks(base, models)
    with pytest.raises(ConfigError, match="method 'iso_c' takes no per-task weights .* methods that do: .*ties"):
        flexmerge.merge(tasks, size=1, method="iso_c", params={"weights": {"task0": 2.0}})
    with pytest.raises(ConfigError, match=r"weights name 'nope', not among the tasks \(task0, task1, task2, task3\)"):
        flexmerge.merge(tasks, size=1, method="ties", params={"weights": {"nope": 2.0}})


def test_the_cli_takes_a_weight_per_task(zoo, tmp_path):
    base, models = zoo
    args = ["merge", "--base", str(base), *[f"--model={n}={p}" for n, p in list(models.items())[:3]],
            "--method", "task_arithmetic", "--param", "convention=sum", "--param", "lam=1.0", "--size", "1"]
    r = runner.invoke(app, [*args, "--weight", "task0=0.3", "--weight", "task2=0.6", "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["method"]["weights"] == {"task0": 0.3, "task2": 0.6}
    r = runner.invoke(app, [*args, "--weight", "task0=x", "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "--weight 'task0=x' must be NAME=W" in r.output


def test_a_mergekit_config_with_unequal_weights_runs_at_1x_as_mergekit(zoo, tmp_path):
    base, models = zoo
    doc = {"merge_method": "ties", "base_model": "zoo/base.safetensors", "size": 1,
           "parameters": {"density": 1.0, "lambda": 0.9},
           "models": [{"model": f"zoo/{n}.safetensors", "parameters": {"weight": w}} for n, w in WEIGHTS.items()]}
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(doc))
    r = runner.invoke(app, ["merge", "--config", str(tmp_path / "mk.yml"), "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    out = tmp_path / "task0.safetensors"
    assert runner.invoke(app, ["export", str(tmp_path / "out"), "--task", "task0", "--out", str(out)]).exit_code == 0
    theta0, thetas, _ = _models(zoo)
    _assert_each_tensor(load_file(out), lambda k: theta0[k] + _gta(torch.stack([t[k] - theta0[k] for t in thetas]),
                                                                   list(WEIGHTS.values()), True, True, 0.9), theta0)


# --- mergekit's methods: the formulas of mergekit/merge_methods/*.py and sparsify.py, per tensor ------------
# Each reference takes the group's models θ_i (in task order), θ0 and the members' weights, and
# returns the merged tensor as mergekit computes it (its code, transcribed; float32).


def ref_linear(thetas, theta0, w, normalize=True):
    result = torch.zeros_like(thetas[0])
    for t, c in zip(thetas, w):
        result.addcmul_(t, torch.tensor(c))
    return result / sum(w) if normalize else result


def magnitude_outliers(tensor, density, gamma):
    n = tensor.numel()
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    indices = torch.sort(tensor.abs().reshape(-1), descending=False).indices
    mask = torch.zeros(n)
    mask[indices[bottom:bottom + target]] = 1
    return tensor * mask.reshape_as(tensor)


def rescaled(tensor, masked):
    before, after = tensor.abs().sum(), masked.abs().sum()
    return masked if before < 1e-7 or after < 1e-7 else masked * (before / after)


def ref_breadcrumbs(thetas, theta0, w, density, gamma, consensus, normalize=False, lam=1.0, rescale=False):
    deltas = []
    for t in thetas:
        tau = t - theta0
        kept = magnitude_outliers(tau, density, gamma)
        deltas.append(rescaled(tau, kept) if rescale else kept)
    return theta0 + _gta(torch.stack(deltas), w, consensus, normalize, lam)


def ref_sce(thetas, theta0, w, select_topk):
    tvs = torch.stack([t - theta0 for t in thetas])
    if select_topk < 1:
        var = torch.var(tvs, dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * select_topk)
        mask = torch.zeros_like(var)
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
        tvs = tvs * mask.unsqueeze(0)
    majority = (tvs.sum(0) >= 0).float() * 2 - 1
    erase = (tvs.sign() == majority).float()
    weights = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    weights = weights / weights.sum()
    erased = weights.view(-1, *[1] * (tvs.dim() - 1)) * erase
    return theta0 + (tvs * erased).sum(0) / erased.sum(0).clamp(min=1e-6)


def ref_model_stock(thetas, theta0, w, filter_wise=False):
    w0, ws = theta0, list(thetas)
    if filter_wise:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [x.unsqueeze(0) for x in ws]
    else:
        w0, ws = w0.reshape(-1), [x.reshape(-1) for x in ws]
    offsets = [x - w0 for x in ws]
    cos = [((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-6)).clamp(-1, 1)
           for i, a in enumerate(offsets) for b in offsets[i + 1:]]
    cos = torch.stack(cos).mean(0).unsqueeze(-1)
    n = len(ws)
    t = n * cos / (1 + (n - 1) * cos)
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(theta0.shape)


def ref_slerp(thetas, theta0, w, t):
    a, b = thetas[0].reshape(-1), thetas[1].reshape(-1)
    na, nb = a.norm(), b.norm()
    dot = ((a / na) * (b / nb)).sum().clamp(-1, 1)
    if dot.abs() > 0.9995:
        return ((1 - t) * a + t * b).reshape(theta0.shape)
    theta = torch.acos(dot)
    return (torch.sin((1 - t) * theta) / torch.sin(theta) * a + torch.sin(t * theta) / torch.sin(theta) * b
            ).reshape(theta0.shape)


def ref_nuslerp(thetas, theta0, w, with_base=True, row_wise=False, flatten=True):
    t = w[1] / sum(w)
    v0, v1 = (thetas[0] - theta0, thetas[1] - theta0) if with_base else (thetas[0], thetas[1])
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    unit = lambda x: x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)  # noqa: E731
    cos = (unit(v0) * unit(v1)).sum(-1, keepdim=True).clamp(-1, 1)
    theta = torch.acos(cos)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return (theta0 if with_base else 0) + result.reshape(shape)


def ref_multislerp(thetas, theta0, w, with_base=True):
    tensors = torch.stack([t - theta0 for t in thetas]) if with_base else torch.stack(thetas)
    flat = tensors.view(tensors.shape[0], -1)
    weights = torch.tensor(w) / sum(w)
    norms = torch.norm(flat, dim=-1, keepdim=True)
    unit = flat / (norms + 1e-8)
    mean = (unit * weights.view(-1, 1)).sum(0)
    mean = mean / torch.norm(mean)
    tangents = unit - (unit * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * weights.view(-1, 1)).sum(0)
    tn = torch.norm(tangent) + 1e-8
    result = (mean * torch.cos(tn) + tangent * (torch.sin(tn) / tn)) * (norms.squeeze(-1) * weights).sum()
    return result.view(theta0.shape) + (theta0 if with_base else 0)


def ref_karcher(thetas, theta0, w, max_iter=10, tol=1e-5):
    alphas = [x / sum(w) for x in w]  # mergekit: 1/n each
    norms = [torch.linalg.vector_norm(x) for x in thetas]
    units = [x / n for x, n in zip(thetas, norms)]
    mean = sum(a * u for a, u in zip(alphas, units))
    mean = mean / torch.linalg.vector_norm(mean)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(alphas, units):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tn = torch.linalg.vector_norm(tangent)
        if tn.item() < tol:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)
        mean = mean / torch.linalg.vector_norm(mean)
    return sum(a * n for a, n in zip(alphas, norms)) * mean


def ref_nearswap(thetas, theta0, w, t):
    a, b = thetas
    weight = (t / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


def ref_arcee_fusion(thetas, theta0, w):
    a, b = thetas
    p = torch.softmax(b, dim=-1) + 1e-8
    q = torch.softmax(a, dim=-1) + 1e-8
    importance = (b - a).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    ordered = torch.sort(importance.reshape(-1)).values
    q1, median, q3 = ordered[(torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()]
    mask = (importance >= median + 1.5 * (q3 - q1)).float()
    return a + (b - a) * mask


def ref_ram(thetas, theta0, w, epsilon=1e-5, plus=None):
    tv = torch.stack([t - theta0 for t in thetas]).view(len(thetas), -1)
    nonzero = tv.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    overlap, unique = counts > 1, counts == 1
    boost = torch.ones(len(thetas), 1)
    if plus is not None:
        r, alpha = plus
        rho = (nonzero & overlap).sum(dim=1) / (nonzero & unique).sum(dim=1).clamp(min=epsilon)
        boost = (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1)
    z = tv * nonzero
    merged = ((z * unique * boost) + (z * overlap / counts.clamp(min=1))).sum(dim=0)
    return theta0 + merged.reshape_as(theta0)


DETERMINISTIC = [  # (method, params, tasks, reference)
    ("linear", {"weights": WEIGHTS}, 3, ref_linear),
    ("linear", {"weights": WEIGHTS, "normalize": False}, 3, lambda th, t0, w: ref_linear(th, t0, w, False)),
    ("breadcrumbs", {"density": 0.6, "gamma": 0.05, "weights": WEIGHTS, "lam": 1.2}, 3,
     lambda th, t0, w: ref_breadcrumbs(th, t0, w, 0.6, 0.05, False, lam=1.2)),
    ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.1, "normalize": True, "rescale": True}, 3,
     lambda th, t0, w: ref_breadcrumbs(th, t0, w, 0.5, 0.1, True, normalize=True, rescale=True)),
    ("sce", {}, 3, lambda th, t0, w: ref_sce(th, t0, w, 1.0)),
    ("sce", {"select_topk": 0.4}, 3, lambda th, t0, w: ref_sce(th, t0, w, 0.4)),
    ("model_stock", {}, 3, ref_model_stock),
    ("model_stock", {"filter_wise": True}, 3, lambda th, t0, w: ref_model_stock(th, t0, w, True)),
    ("slerp", {"t": 0.3}, 2, lambda th, t0, w: ref_slerp(th, t0, w, 0.3)),
    ("nuslerp", {"weights": {"task0": 0.7, "task1": 0.4}}, 2, ref_nuslerp),
    ("nuslerp", {"space": "weights", "nuslerp_flatten": False, "nuslerp_row_wise": True}, 2,
     lambda th, t0, w: ref_nuslerp(th, t0, w, with_base=False, row_wise=True, flatten=False)),
    ("multislerp", {"weights": WEIGHTS}, 3, ref_multislerp),
    ("multislerp", {"space": "weights"}, 3, lambda th, t0, w: ref_multislerp(th, t0, w, with_base=False)),
    ("karcher", {}, 3, ref_karcher),
    ("nearswap", {"t": 0.02}, 2, lambda th, t0, w: ref_nearswap(th, t0, w, 0.02)),
    ("arcee_fusion", {}, 2, ref_arcee_fusion),
    ("ram", {"epsilon": 0.02}, 3, lambda th, t0, w: ref_ram(th, t0, w, 0.02)),
    ("ramplus_tl", {"epsilon": 0.02, "r": 0.5, "alpha": 0.3}, 3,
     lambda th, t0, w: ref_ram(th, t0, w, 0.02, plus=(0.5, 0.3))),
]


def _group_weights(params: dict, names: list[str]) -> list[float]:
    return [params.get("weights", {}).get(n, 1.0) for n in names]


@pytest.mark.parametrize("method, params, n, reference", DETERMINISTIC,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(DETERMINISTIC)])
def test_each_method_at_1x_is_mergekits_formula(zoo, method, params, n, reference):
    theta0, thetas, models = _models(zoo, n)
    w = _group_weights(params, list(models))
    _assert_each_tensor(_merged(zoo, method, params, n), lambda k: reference([t[k] for t in thetas], theta0[k], w),
                        theta0)


@pytest.mark.parametrize("method, params, n, reference", DETERMINISTIC,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(DETERMINISTIC)])
def test_each_method_merges_the_groups_of_an_intermediate_size(zoo, method, params, n, reference):
    """Between 1x and Mx, every group of every block is the formula over its members (a member alone
    keeps its own model): the method exists at every size."""
    base, models = zoo
    tasks = flexmerge.load_tasks(base, dict(list(models.items())[:n]))
    fm = flexmerge.merge(tasks, size=(1 + n) / 2, method=method, params=params)
    theta0 = load_file(base)
    thetas = [load_file(p) for p in list(models.values())[:n]]
    sizes = set()
    for block, groups in zip(fm.partition.blocks, fm.assignment.groups):
        for g in groups:
            names = [tasks.names[t] for t in g]
            got = fm.state_dict(names[0])
            for part in block.parts:
                k = part.key
                expected = thetas[g[0]][k] if len(g) == 1 else reference(
                    [thetas[t][k] for t in g], theta0[k], _group_weights(params, names))
                torch.testing.assert_close(got[k], expected, rtol=2e-6, atol=2e-6, msg=f"{k} {names}")
            sizes.add(len(g))
    assert 1 in sizes and max(sizes) >= 2  # both copies and merged groups were checked


# --- random methods: DELLA's draws are flexmerge's seeded ones; everything else is mergekit's formula ------


def _della_masks(tasks, density: float, epsilon: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per key, the (M, ...) entries MAGPRUNE keeps (before any rescale)."""
    from flexmerge.preprocess import MagPrune, Pipeline

    pipe = Pipeline([MagPrune(density, epsilon, seed)]).fit(tasks)
    return {k: torch.cat([pipe.deltas(tasks, c) for c in tasks.chunks(k)], 1) != 0 for k in tasks.mergeable}


@pytest.mark.parametrize("method, normalize", [("della", True), ("della_linear", False)])
def test_della_at_1x_is_mergekits_formula_on_its_drawn_masks(zoo, monkeypatch, method, normalize):
    """Given the entries MAGPRUNE kept, the rest is deterministic: mergekit's L1 rescale of each tensor
    and its weighted (TIES-elected for della) merge. The draws do not depend on chunking: the same
    merge with 16-entry chunks (1-D tensors then ranked across chunks) is bit for bit the same."""
    from flexmerge import taskvec

    base, models = zoo
    theta0, thetas, chosen = _models(zoo)
    tasks = flexmerge.load_tasks(base, chosen)
    params = {"density": 0.5, "epsilon": 0.2, "weights": WEIGHTS, "lam": 0.9, "seed": 7}
    got = flexmerge.merge(tasks, size=1, method=method, params=params).state_dict("task0")
    masks = _della_masks(tasks, 0.5, 0.2, seed=7)

    def expected(k):
        taus = [t[k] - theta0[k] for t in thetas]
        kept = torch.stack([rescaled(tau, tau * m) for tau, m in zip(taus, masks[k])])
        return theta0[k] + _gta(kept, list(WEIGHTS.values()), consensus=method == "della", normalize=normalize,
                                lam=0.9)

    _assert_each_tensor(got, expected, theta0)
    monkeypatch.setattr(taskvec, "CHUNK_ELEMENTS", 16)
    chunked = flexmerge.merge(flexmerge.load_tasks(base, chosen), size=1, method=method,
                              params=params).state_dict("task0")
    assert all(torch.equal(chunked[k], got[k]) for k in got)


def test_magprune_keeps_entries_with_mergekits_rank_probabilities(tmp_path):
    """mergekit's della_magprune keeps the entry of rank r (0-based) of a row of C with probability
    density − ε + 2ε·r/(C − 1): flexmerge's draws keep each fifth of the ranks at that rate."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(200, 300, generator=g)}
    save_file(base, str(tmp_path / "base.safetensors"))
    models = {}
    for t in range(2):
        save_file({"w": base["w"] + 0.05 * torch.randn(200, 300, generator=g)}, str(tmp_path / f"t{t}.safetensors"))
        models[f"t{t}"] = tmp_path / f"t{t}.safetensors"
    tasks = flexmerge.load_tasks(tmp_path / "base.safetensors", models)
    density, epsilon = 0.4, 0.15
    kept = _della_masks(tasks, density, epsilon)["w"]
    taus = torch.stack([load_file(p)["w"] - base["w"] for p in models.values()])
    ranks = taus.abs().argsort(dim=-1).argsort(dim=-1).float() / 299  # mergekit's rank_norm
    for b in range(5):
        in_fifth = (ranks >= b / 5) & (ranks < (b + 1) / 5)
        probability = (density - epsilon) + ranks[in_fifth] * 2 * epsilon
        assert abs(float(kept[in_fifth].float().mean()) - float(probability.mean())) < 0.01  # ~24000 draws each
    assert abs(float(kept.float().mean()) - density) < 0.005
    assert not torch.equal(kept, _della_masks(tasks, density, epsilon, seed=1)["w"])  # the seed draws


# --- two-model methods, and the base as one of the models ---------------------------------------------------


def test_a_two_model_method_refuses_more_tasks_in_one_sentence(zoo):
    base, models = zoo
    with pytest.raises(ConfigError, match=r"method 'slerp' merges two models, got 4 tasks: for more, use "
                                          r"multislerp or karcher"):
        flexmerge.merge_files(base, models, "unused", size=1, method="slerp", params={"t": 0.5})
    with pytest.raises(ConfigError, match=r"invalid parameters for method 'nearswap': t: Field required"):
        flexmerge.merge_files(base, models, "unused", size=1, method="nearswap")


def test_mergekits_slerp_of_its_base_and_one_model_runs_with_the_base_as_a_task(zoo, tmp_path):
    """mergekit's slerp merges base_model (t = 0) with one other model. In flexmerge both are tasks
    and the base is the first of them: a method that merges weights accepts a task equal to the base,
    which any other refuses (the sign of a wrong file)."""
    base, models = zoo
    pair = {"first": models["task0"], "second": models["task1"]}
    config = {"base": str(models["task0"]), "models": {k: str(v) for k, v in pair.items()},
              "method": "slerp", "params": {"t": 0.3}, "size": 1}
    (tmp_path / "slerp.yml").write_text(yaml.safe_dump(config))
    r = runner.invoke(app, ["merge", "--config", str(tmp_path / "slerp.yml"), "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    got = flexmerge.load(tmp_path / "out").state_dict("first")
    first, second = load_file(pair["first"]), load_file(pair["second"])
    for k in first:
        torch.testing.assert_close(got[k], ref_slerp([first[k], second[k]], first[k], None, 0.3), rtol=2e-6, atol=2e-6)
    config["method"], config["params"] = "task_arithmetic", {}
    (tmp_path / "ta.yml").write_text(yaml.safe_dump(config))
    r = runner.invoke(app, ["merge", "--config", str(tmp_path / "ta.yml"), "--out", str(tmp_path / "ta")])
    assert r.exit_code == 2 and "is identical to the base" in r.output
