"""Merging methods: textbook formulas at 1x, contracts, and the streaming preprocessing."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import flexmerge
from flexmerge.errors import ConfigError, UnknownNameError
from flexmerge.blocks import PartView
from flexmerge.methods import available_methods, get_method


def _load(zoo):
    base, models = zoo
    return load_file(base), {n: load_file(p) for n, p in models.items()}


def _mergeable(base, fts):
    return [k for k in base if any(not torch.equal(ft[k], base[k]) for ft in fts.values())]


def _one_model(tasks, method, **params):
    flex = flexmerge.merge(tasks, size=1.0, method=method, params=params)
    sds = [flex.state_dict(t) for t in tasks.names]
    for sd in sds[1:]:
        assert all(sd[k] is sds[0][k] for k in sd)  # one stored copy, shared by every task
    return sds[0]


@pytest.mark.parametrize("convention, lam", [("mean", 1.5), ("sum", 0.3)])
def test_task_arithmetic_at_1x_is_the_textbook_formula(zoo, tasks, convention, lam):
    base, fts = _load(zoo)
    merged = _one_model(tasks, "task_arithmetic", lam=lam, convention=convention)
    for k in _mergeable(base, fts):
        taus = torch.stack([ft[k] - base[k] for ft in fts.values()])
        expected = base[k] + lam * (taus.mean(0) if convention == "mean" else taus.sum(0))
        torch.testing.assert_close(merged[k], expected, rtol=0, atol=1e-6)


def test_average_at_1x(zoo, tasks):
    base, fts = _load(zoo)
    merged = _one_model(tasks, "average")
    for k in _mergeable(base, fts):
        expected = torch.stack([ft[k] for ft in fts.values()]).mean(0)
        torch.testing.assert_close(merged[k], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("trim", ["reference", "exact"])
def test_ties_at_1x_is_the_textbook_formula(zoo, tasks, trim):
    """Written from the TIES code (reference: the (D − int(K·D))-th smallest magnitude is the
    threshold, kept with >=) and the paper (exact: round(K·D) entries): global trim per model,
    elect, disjoint mean, λ."""
    base, fts = _load(zoo)
    keys = _mergeable(base, fts)
    keep, lam = 0.2, 0.9
    flat = torch.stack([torch.cat([(ft[k] - base[k]).flatten() for k in keys]) for ft in fts.values()])
    n = flat.shape[1]
    rank = n - int(n * keep) if trim == "reference" else n - int(round(keep * n)) + 1
    kth = flat.abs().kthvalue(rank, dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    merged_tv = lam * (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    kept = (flat.abs() >= kth).sum(1)
    assert (kept == (int(n * keep) + 1 if trim == "reference" else int(round(keep * n)))).all()
    merged = _one_model(tasks, "ties", keep=keep, lam=lam, trim=trim)
    offset = 0
    for k in keys:
        numel = base[k].numel()
        expected = base[k] + merged_tv[offset: offset + numel].view_as(base[k])
        offset += numel
        torch.testing.assert_close(merged[k], expected, rtol=0, atol=1e-6)


def test_emr_and_consensus_follow_their_definitions():
    d = torch.tensor([[1.0, -2.0, 0.5, 0.0], [3.0, 1.0, -0.5, 0.2], [-1.0, -1.0, 1.0, 0.1]])
    emr = get_method("emr").merge(d)
    assert torch.equal(emr.delta, torch.tensor([3.0, -2.0, 1.0, 0.2]))
    assert torch.equal(emr.masks, torch.tensor([[1, 1, 1, 0], [1, 0, 0, 1], [0, 1, 1, 1]], dtype=torch.bool))
    expected_scale0 = d[0].abs().mean() / (emr.delta.abs() * emr.masks[0]).mean()
    torch.testing.assert_close(emr.scales[0], expected_scale0)
    cons = get_method("consensus", lam_c=0.3).merge(d)
    total = d.sum(0)
    torch.testing.assert_close(cons.delta, total)
    assert torch.equal(cons.masks, d.abs() > 0.3 * (total - d).abs())


REQUIRED = {"slerp": {"t": 0.3}, "nearswap": {"t": 0.5}}  # parameters without a default (as mergekit's)


@pytest.mark.parametrize("name", sorted(available_methods()))
def test_method_contract(name):
    method = get_method(name, **REQUIRED.get(name, {}))
    n = 2 if method.pairwise else 5  # members; a method that reads θ0 gets it as one more row
    d = torch.randn(n + method.needs_base, 300, generator=torch.Generator().manual_seed(0))
    a, b = method.merge(d.clone()), method.merge(d.clone())
    assert a.delta.shape == (300,) and a.delta.dtype == torch.float32
    assert torch.equal(a.delta, b.delta)  # deterministic
    assert torch.isfinite(a.delta).all()
    if method.uses_masks:
        assert a.masks.shape == (n, 300) and a.masks.dtype == torch.bool
    else:
        assert a.masks is None
    assert method.describe()["name"] == name


def test_method_errors_name_the_value_and_choices():
    with pytest.raises(UnknownNameError, match=r"unknown merging method 'tiez'; choose one of: arcee_fusion, average, breadcrumbs"):
        get_method("tiez")
    with pytest.raises(ConfigError, match=r"invalid parameters for method 'ties': keep"):
        get_method("ties", keep=20)
    with pytest.raises(ConfigError, match=r"invalid parameters for method 'emr': lam: Extra inputs"):
        get_method("emr", lam=1.0)


def test_streaming_trim_threshold_is_exact(tasks, monkeypatch):
    from flexmerge import taskvec
    from flexmerge.preprocess import Pipeline, kth_largest_abs

    flat = torch.cat([tasks.deltas(c).flatten(1) for k in tasks.mergeable for c in tasks.chunks(k)], 1)
    for k in [1, 7, 1000, flat.shape[1] // 5, flat.shape[1]]:
        expected = flat.abs().topk(k, dim=1).values[:, -1].tolist()
        monkeypatch.setattr(taskvec, "CHUNK_ELEMENTS", 97)  # many small chunks
        assert kth_largest_abs(tasks, Pipeline(), k) == expected


def test_dare_is_chunking_independent_and_drops_at_rate(tasks, monkeypatch):
    from flexmerge import taskvec
    from flexmerge.preprocess import DareDrop, Pipeline

    pipe = Pipeline([DareDrop(0.7, seed=3)])
    key = "layers.0.mlp.fc1.weight"
    whole = torch.cat([pipe.deltas(tasks, c) for c in tasks.chunks(key)], 1)
    monkeypatch.setattr(taskvec, "CHUNK_ELEMENTS", 50)
    chunked = torch.cat([pipe.deltas(tasks, c) for c in tasks.chunks(key)], 1)
    assert len(list(tasks.chunks(key))) > 1
    assert torch.equal(whole, chunked)
    raw = torch.cat([tasks.deltas(c) for c in tasks.chunks(key)], 1)
    kept = whole != 0
    assert 0.25 < kept.float().mean() < 0.35
    torch.testing.assert_close(whole[kept], raw[kept] / 0.3)
    other = torch.cat([Pipeline([DareDrop(0.7, seed=4)]).deltas(tasks, c) for c in tasks.chunks(key)], 1)
    assert not torch.equal(other != 0, kept)


@pytest.mark.parametrize("name", sorted(available_methods()))
def test_chunked_merge_equals_whole_block_merge(name):
    method = get_method(name, **REQUIRED.get(name, {}))
    d = torch.randn((2 if method.pairwise else 4) + method.needs_base, 1000, generator=torch.Generator().manual_seed(1))
    whole = method.merge(d)
    chunked = method.merge_chunks([(0, c) for c in d.split([100, 250, 650], dim=1)], [PartView("w", (1000,))])
    torch.testing.assert_close(chunked.delta, whole.delta, rtol=0, atol=0)
    if whole.masks is not None:
        assert torch.equal(chunked.masks, whole.masks)
    if whole.scales is not None:
        torch.testing.assert_close(chunked.scales, whole.scales)


def test_a_method_returning_a_view_of_its_input_survives_reused_chunk_buffers(tasks, monkeypatch):
    """Merging streams chunks through one reused buffer; a result aliasing it must not be overwritten."""
    from flexmerge import taskvec
    from flexmerge.methods.base import GroupResult, MergeMethod

    class FirstMember(MergeMethod):
        name, summary, elementwise = "first_member", "test: the first member's task vector, as a view", True

        def merge(self, deltas):
            return GroupResult(deltas[0])

    monkeypatch.setattr(taskvec, "CHUNK_ELEMENTS", 100)  # fc1 (32 x 16) is read in 7 chunks
    merged = flexmerge.merge(tasks, size=1.0, method=FirstMember())  # one group (0, 1, ...) per block
    first = load_file(str(tasks.sources[0].path))
    for task in tasks.names:
        for key, value in merged.state_dict(task).items():
            torch.testing.assert_close(value, first[key])  # θ0 + τ_0 = θ_0 up to rounding


# Generalized task arithmetic (flexmerge/methods/generalized.py): the component against formulas.

SIGNS = torch.tensor([[1.0, -2.0, 0.5, 0.0],
                      [-3.0, 1.0, 0.5, 0.0],
                      [1.0, 1.0, -2.0, 0.0]])  # column sums -1, 0, -1, 0; sign counts +1, +1, +1, 0


def test_sign_election_by_sum_and_by_count():
    from flexmerge.methods.generalized import elect

    assert torch.equal(elect(SIGNS, "sum"), torch.tensor([-1.0, 1.0, -1.0, 1.0]))  # a zero sum elects +
    assert torch.equal(elect(SIGNS, "count"), torch.tensor([1.0, 1.0, 1.0, 1.0]))  # the majority's sign
    assert elect(SIGNS, "none") is None


@pytest.mark.parametrize("consensus, combine, expected", [
    ("sum", "sum", [-3.0, 2.0, -2.0, 0.0]),  # the agreeing entries summed
    ("sum", "mean", [-3.0, 1.0, -2.0, 0.0]),  # ... divided by how many agree (at least 1)
    ("count", "sum", [2.0, 2.0, 1.0, 0.0]),
    ("count", "mean", [1.0, 1.0, 0.5, 0.0]),
    ("none", "sum", [-1.0, 0.0, -1.0, 0.0]),  # Σ τ
    ("none", "mean", [-1 / 3, 0.0, -1 / 3, 0.0]),  # Σ τ / n
])
@pytest.mark.parametrize("lam", [1.0, 2.5])
def test_combine_mean_or_sum_scaled_by_lambda(consensus, combine, expected, lam):
    from flexmerge.methods.generalized import GTAConfig, merge

    got = merge(SIGNS.clone(), GTAConfig(consensus=consensus, combine=combine, lam=lam))
    torch.testing.assert_close(got, lam * torch.tensor(expected), rtol=1e-7, atol=0)


@pytest.mark.parametrize("rule, kept", [("reference", 4), ("exact", 3), ("floor", 3)])
def test_magnitude_trim_keeps_each_rows_top_k(rule, kept):
    from flexmerge.methods.generalized import magnitude_trim

    row = torch.tensor([0.1, -0.5, 0.3, 2.0, -1.0, 0.05, 0.7, -0.2, 0.9, 0.4])  # keep 0.3 of 10
    top = [2.0, -1.0, 0.9, 0.7]  # by magnitude
    got = magnitude_trim(torch.stack([row, -row]), 0.3, rule)
    want = torch.where(torch.isin(row, torch.tensor(top[:kept])), row, 0.0)
    assert torch.equal(got, torch.stack([want, -want]))
    d = torch.randn(3, 7, 11, generator=torch.Generator().manual_seed(2))
    trimmed = magnitude_trim(d, 0.25, rule)
    k = {"reference": int(77 * 0.25) + 1, "exact": round(77 * 0.25), "floor": int(77 * 0.25)}[rule]
    for r in range(3):
        kept_ = trimmed[r] != 0
        assert int(kept_.sum()) == k and torch.equal(trimmed[r][kept_], d[r][kept_])
        assert d[r][kept_].abs().min() > d[r][~kept_].abs().max()


def test_dare_drops_below_p_and_rescales_the_rest():
    from flexmerge.methods.generalized import dare_drop

    g = torch.Generator().manual_seed(3)
    d, u, p = torch.randn(4, 500, generator=g), torch.rand(4, 500, generator=g), 0.6
    out = dare_drop(d, p, u)
    assert torch.equal(out[u < p], torch.zeros(int((u < p).sum())))
    assert torch.equal(out[u >= p], d[u >= p] / (1 - p))
    draws = torch.rand(20_000, 4, generator=g)  # the rescale keeps each entry's expectation
    mean = dare_drop(torch.tensor([1.0, -2.0, 0.5, 3.0]).expand(20_000, 4), p, draws).mean(0)
    torch.testing.assert_close(mean, torch.tensor([1.0, -2.0, 0.5, 3.0]), rtol=0.05, atol=0)


@pytest.mark.parametrize("scope", ["model", "tensor"])
def test_streamed_sparsification_is_the_component_on_whole_task_vectors(tasks, scope):
    """GTAConfig.transforms (DARE, then the trim, fitted and streamed by preprocess) give what the
    component's `sparsify` gives on the task vectors held whole, bit for bit."""
    from flexmerge.methods.generalized import GTAConfig, sparsify
    from flexmerge.preprocess import Pipeline, hashed_uniform

    cfg = GTAConfig(dare=0.3, seed=5, keep=0.4, trim="floor", trim_scope=scope)
    pipe = Pipeline(cfg.transforms()).fit(tasks)
    keys = list(tasks.mergeable)
    raw = {k: torch.cat([tasks.deltas(c) for c in tasks.chunks(k)], 1).flatten(1) for k in keys}
    streamed = {k: torch.cat([pipe.deltas(tasks, c) for c in tasks.chunks(k)], 1).flatten(1) for k in keys}
    draws = {k: torch.stack([hashed_uniform(5, t, k, 0, raw[k].shape[1]) for t in range(tasks.num_tasks)])
             for k in keys}
    if scope == "tensor":
        for k in keys:
            assert torch.equal(streamed[k], sparsify(raw[k], cfg, draws[k]))
    else:
        whole = sparsify(torch.cat([raw[k] for k in keys], 1), cfg, torch.cat([draws[k] for k in keys], 1))
        assert torch.equal(torch.cat([streamed[k] for k in keys], 1), whole)


def test_the_generalized_methods_are_configs_of_the_component():
    from flexmerge.methods.generalized import GTAConfig

    assert get_method("task_arithmetic", lam=0.7).config == GTAConfig(combine="mean", lam=0.7)
    assert get_method("dare", dare=0.4, convention="sum").config == GTAConfig(dare=0.4, combine="sum", lam=1.5)
    assert get_method("ties", keep=0.3, combine="sum").config == GTAConfig(keep=0.3, consensus="sum",
                                                                           combine="sum")
    assert get_method("consensus", lam=0.5).config == GTAConfig(combine="sum", lam=0.5)  # TALL: λ·Σ τ
    assert get_method("twin").config == GTAConfig(combine="sum", lam=0.3)
    assert get_method("twin", base="ties", trim_scope="tensor").config == GTAConfig(
        keep=0.2, trim_scope="tensor", consensus="sum", combine="mean", lam=1.0)
    with pytest.raises(ConfigError, match="consensus must be one of 'none', 'sum', 'count', got 'majority'"):
        GTAConfig(consensus="majority")


def _ties_per_tensor(taus: torch.Tensor, keep: float, combine: str) -> torch.Tensor:
    """TIES on one tensor's (n, ...) task vectors, mergekit's way: int(keep·D) largest magnitudes
    of the tensor kept, sign of the trimmed sum elected (0 elects +), agreeing entries summed or
    averaged; λ = 1."""
    flat = taus.flatten(1)
    kth = flat.abs().topk(int(flat.shape[1] * keep), dim=1).values[:, -1:]
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    agree = trimmed * sign > 0
    total = (trimmed * agree).sum(0)
    merged = total if combine == "sum" else total / agree.sum(0).clamp(min=1)
    return merged.view(taus.shape[1:])


def _all_merged(tasks, spec: str):
    """Every block one group of all tasks: the method's own merge (the path's last point)."""
    from flexmerge.flexmodel.materialize import materialize

    method = get_method(spec)
    path = flexmerge.plan(tasks, method=method)
    return materialize(tasks, flexmerge.discover_blocks(tasks), path.assignment(len(path.steps)), method)


@pytest.mark.parametrize("spec", ["consensus:base=ties", "twin:base=ties:rank=1"])
def test_consensus_and_twin_take_ties_trim_scope_and_combine(zoo, tasks, spec):
    base, fts = _load(zoo)
    options = ":keep=0.3:trim=floor:trim_scope=tensor:combine=sum"
    flex, default = _all_merged(tasks, spec + options), _all_merged(tasks, spec + ":keep=0.3")
    checked = 0
    for b, block in enumerate(flex.partition.blocks):
        (group,) = flex.blocks[b].groups
        for p, part in enumerate(block.parts):
            taus = torch.stack([ft[part.key] - base[part.key] for ft in fts.values()])
            shared = _ties_per_tensor(taus, 0.3, "sum")
            stored = group.tensors[p] if group.masked else group.tensors[p] - base[part.key]
            torch.testing.assert_close(stored, shared, rtol=0, atol=1e-6)
            assert not torch.allclose(default.blocks[b].groups[0].tensors[p], group.tensors[p])  # options count
            checked += 1
    assert checked == len(tasks.mergeable)
    assert flex.method["trim_scope"] == "tensor" and flex.method["combine"] == "sum"


def test_options_added_later_are_recorded_only_when_set():
    """consensus and twin gained trim_scope and combine after artifacts were written with them:
    what a merge that leaves them at their defaults records (the manifest) is unchanged."""
    for name in ("consensus", "twin"):
        assert not {"trim_scope", "combine"} & set(get_method(name).describe())
        assert get_method(name, combine="sum").describe()["combine"] == "sum"
    assert {"trim_scope", "combine"} <= set(get_method("ties").describe())  # ties always had them


# Method specs (MethodSpec): one syntax for a method and its parameters.

@pytest.mark.parametrize("text, name, params", [
    ("ties", "ties", {}),
    ("ties:keep=0.3", "ties", {"keep": 0.3}),
    ("twin:rank=4:base=ties", "twin", {"rank": 4, "base": "ties"}),
    ("x:flag=true:none=null:l=[1, 2]:s=\"true\":n=-1e-05", "x",
     {"flag": True, "none": None, "l": [1, 2], "s": "true", "n": -1e-05}),
])
def test_method_spec_parse_and_canonical_text_round_trip(text, name, params):
    from flexmerge.methods import MethodSpec

    spec = MethodSpec.parse(text)
    assert (spec.name, dict(spec.params)) == (name, params)
    assert str(spec) == text and MethodSpec.parse(str(spec)) == spec
    assert MethodSpec(name, params) == spec and hash(MethodSpec(name, params)) == hash(spec)


def test_method_spec_canonical_text_and_value():
    from flexmerge.methods import MethodSpec

    assert str(MethodSpec.parse(" twin : rank = 4 : base = ties ")) == "twin:rank=4:base=ties"
    assert str(MethodSpec.parse("ties:keep=0.30")) == "ties:keep=0.3"
    assert str(MethodSpec("x", {"s": " padded", "t": "1"})) == 'x:s=" padded":t="1"'  # text JSON would change
    spec = MethodSpec.parse("ties:keep=0.3")
    assert MethodSpec.parse("twin:rank=4:base=ties") == MethodSpec.parse("twin:base=ties:rank=4")
    assert len({spec, MethodSpec.parse("ties:keep=0.3"), MethodSpec("ties")}) == 2
    with pytest.raises(TypeError):
        spec.params["keep"] = 0.5  # a value: read-only
    assert get_method(spec).p.keep == 0.3 and spec.build().p.keep == 0.3


@pytest.mark.parametrize("text, message", [
    ("twin:rank4", "method spec 'twin:rank4': 'rank4' is not key=value"),
    ("twin:=4", "'=4' is not key=value"),
    (":rank=4", "method spec ':rank=4' names no method"),
    ("ties:keep=0.3:keep=0.5", "method spec 'ties:keep=0.3:keep=0.5' sets 'keep' twice"),
])
def test_method_spec_syntax_errors(text, message):
    from flexmerge.methods import MethodSpec

    with pytest.raises(ConfigError, match=message):
        MethodSpec.parse(text)


def test_method_spec_build_errors_name_the_key_value_and_choices():
    from flexmerge.methods import MethodSpec

    with pytest.raises(UnknownNameError, match=r"unknown merging method 'tiez'; choose one of: arcee_fusion, average, breadcrumbs"):
        MethodSpec.parse("tiez:keep=0.3").build()
    with pytest.raises(ConfigError, match=r"method 'ties': keep: Input should be less than or equal to 1, got 20"):
        MethodSpec.parse("ties:keep=20").build()
    with pytest.raises(ConfigError, match=r"'ties': trim_scope: Input should be 'model' or 'tensor', got 'layer'"):
        MethodSpec.parse("ties:trim_scope=layer").build()
    with pytest.raises(ConfigError, match=r"'emr': kep: Extra inputs are not permitted \(its parameters: dare, seed, "
                                          r"dtype, task_dare, task_keep, tensor_params, rescale\)"):
        MethodSpec.parse("emr:kep=1").build()
    with pytest.raises(ConfigError, match=r"s='a:b' cannot be written in a method spec"):
        str(MethodSpec("x", {"s": "a:b"}))
    with pytest.raises(ConfigError, match="cannot be written as a parameter name"):
        str(MethodSpec("x", {"a=b": 1}))
    with pytest.raises(ConfigError, match="needs a method name"):
        MethodSpec("")


def test_extra_params_go_under_the_specs_own():
    """`--param` (and a config's params) add to a spec; a key the spec sets keeps the spec's value
    (the documented override: the spec is the more specific statement)."""
    from flexmerge.methods import MethodSpec, parse_params

    extra = parse_params(["keep=0.5", "lam=2", "combine=sum"])
    assert extra == {"keep": 0.5, "lam": 2, "combine": "sum"}
    spec = MethodSpec.parse("ties:keep=0.3").with_params(extra)
    assert str(spec) == "ties:keep=0.3:lam=2:combine=sum"
    method = get_method("ties:keep=0.3", extra)
    assert (method.p.keep, method.p.lam, method.p.combine) == (0.3, 2.0, "sum")
    assert get_method("ties:keep=0.3", keep=0.5).p.keep == 0.3  # keywords too, as before
    with pytest.raises(ConfigError, match="--param 'keep' must be KEY=VALUE"):
        parse_params(["keep"])
    with pytest.raises(ConfigError, match="--param sets 'keep' twice"):
        parse_params(["keep=0.3", "keep=0.5"])
    with pytest.raises(ConfigError, match="'keep' given both in params and as keywords"):
        get_method("ties", {"keep": 0.3}, keep=0.5)
    with pytest.raises(ConfigError, match="an instance, already configured"):
        get_method(get_method("ties"), keep=0.5)
