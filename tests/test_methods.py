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


@pytest.mark.parametrize("name", sorted(available_methods()))
def test_method_contract(name):
    d = torch.randn(5, 300, generator=torch.Generator().manual_seed(0))
    method = get_method(name)
    a, b = method.merge(d.clone()), method.merge(d.clone())
    assert a.delta.shape == (300,) and a.delta.dtype == torch.float32
    assert torch.equal(a.delta, b.delta)  # deterministic
    assert torch.isfinite(a.delta).all()
    if method.uses_masks:
        assert a.masks.shape == (5, 300) and a.masks.dtype == torch.bool
    else:
        assert a.masks is None
    assert get_method(name).describe()["name"] == name


def test_method_errors_name_the_value_and_choices():
    with pytest.raises(UnknownNameError, match=r"unknown merging method 'tiez'; choose one of: average, consensus"):
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
    d = torch.randn(4, 1000, generator=torch.Generator().manual_seed(1))
    method = get_method(name)
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
