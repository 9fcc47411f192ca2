"""The fast streaming paths equal their plain definitions bit for bit: the exact K-th largest
magnitude (against torch.kthvalue), the in-place trim (against torch.where), TIES' disjoint mean
on reused buffers (against the textbook expression)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from flexmerge.methods.kernels import disjoint_mean, elect_sign
from flexmerge.preprocess import TopKTrim, kth_largest, trim_rank
from flexmerge.taskvec import Chunk


def _adversarial(kind: str, rows: int, n: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(rows, n, generator=g)
    if kind == "ties":  # few distinct magnitudes: huge ties at every rank
        x = torch.randint(-3, 4, (rows, n), generator=g).float() * 0.25
    elif kind == "zeros":  # mostly zeros, signed zeros included
        x = torch.where(torch.rand(rows, n, generator=g) < 0.9, 0.0, x)
        x[:, ::7] = -0.0
    elif kind == "denormals":  # subnormal fp32 magnitudes next to normal ones
        x = torch.where(torch.rand(rows, n, generator=g) < 0.5, x * 1e-40, x * 1e-3)
    elif kind == "one_bin":  # every value in the same top-16-bit bin: pass 2 does all the work
        x = 1.0 + torch.rand(rows, n, generator=g) * 2**-8
    return x


def _stream(x: torch.Tensor, piece: int):
    return lambda: (x[:, i:i + piece] for i in range(0, x.shape[1], piece))


@pytest.mark.parametrize("kind", ["random", "ties", "zeros", "denormals", "one_bin"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kth_largest_equals_kthvalue(kind, dtype):
    g = torch.Generator().manual_seed(sum(map(ord, kind + str(dtype))))
    x = _adversarial(kind, 3, 5000, g).to(dtype)
    mags = x.abs().float()
    d = x.shape[1]
    for k in [1, 2, 17, int(0.2 * d) + 1, trim_rank(d, 0.2, "exact"), d - 1, d]:
        expected = mags.kthvalue(d - k + 1, dim=1).values.tolist()  # k-th largest = (D−k+1)-th smallest
        assert kth_largest(_stream(x, 777), k, 3, None, "t") == expected, (kind, dtype, k)


def test_kth_largest_skips_empty_chunks():
    """A zero-size tensor yields a (rows, 0) chunk: it adds no candidates and leaves the thresholds exact."""
    x = torch.randn(3, 900, generator=torch.Generator().manual_seed(3))
    pieces = lambda: iter([x[:, :0], x[:, :400], x[:, 400:400], x[:, 400:]])  # noqa: E731
    k = trim_rank(x.shape[1], 0.2)
    assert kth_largest(pieces, k, 3, None, "t") == x.abs().kthvalue(x.shape[1] - k + 1, dim=1).values.tolist()


def test_kth_largest_is_independent_of_chunking():
    x = torch.randn(2, 3001, generator=torch.Generator().manual_seed(1))
    k = trim_rank(x.shape[1], 0.2)
    assert kth_largest(_stream(x, 1), k, 2, None, "t") == kth_largest(_stream(x, 3001), k, 2, None, "t")


def test_trim_in_place_equals_where_bitwise():
    g = torch.Generator().manual_seed(2)
    x = _adversarial("zeros", 4, 4000, g) + _adversarial("denormals", 4, 4000, g) * (torch.rand(4, 4000) < 0.5)
    x[0, :5] = -0.0
    trim = TopKTrim(0.3)
    trim.thresholds = [0.0, 1e-41, 0.5, float(x[3].abs().max())]
    trim._limits = {None: torch.tensor(trim.thresholds, dtype=torch.float32).view(torch.int32)}
    expected = torch.stack([trim.apply(t, Chunk("k", None), 0, x[t]) for t in range(4)])
    got = x.clone()
    trim.apply_rows(range(4), Chunk("k", None), 0, got)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))  # signed zeros too
    assert (got[1] == 0).sum() > (x[1] == 0).sum()  # the threshold bit: something was dropped


@pytest.mark.parametrize("kind", ["random", "ties", "zeros"])
def test_disjoint_mean_equals_the_textbook_expression_bitwise(kind):
    d = _adversarial(kind, 5, 3000, torch.Generator().manual_seed(3))
    sign = elect_sign(d)
    keep = torch.where(sign > 0, d > 0, d < 0)
    expected = (d * keep).sum(0) / keep.sum(0).clamp_min(1)
    before = d.clone()
    got = disjoint_mean(d, sign)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
    assert torch.equal(d, before)  # the kernel does not touch its input


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_plus_base_equals_add_then_convert_bitwise(dtype, monkeypatch):
    from flexmerge.flexmodel import materialize

    monkeypatch.setattr(materialize, "CHUNK_ELEMENTS", 1000)  # several slices, a ragged last one
    g = torch.Generator().manual_seed(4)
    base = torch.randn(37, 61, generator=g).to(dtype)
    delta = _adversarial("zeros", 1, 37 * 61, g).view(-1) * 1e-2
    expected = delta.clone().view(base.shape).add_(base).to(dtype)
    got = materialize.plus_base(delta.clone(), base, dtype)
    assert got.dtype == dtype and got.shape == base.shape
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))


def _planned_always(monkeypatch):
    import flexmerge.api

    monkeypatch.setattr(flexmerge.api, "cuts_at_last_point", lambda *a, **k: False)


@pytest.mark.parametrize("method, params", [("task_arithmetic", {"lam": 1.0}), ("ties", {"keep": 0.3})])
def test_last_point_without_a_plan_is_the_planned_artifact(zoo, tmp_path, monkeypatch, method, params):
    """--size 1 needs no plan: the artifact (tensors, manifest, info) is the one a planned path gives."""
    import json

    import flexmerge
    import flexmerge.planning

    base, models = zoo
    tasks = flexmerge.load_tasks(base, models)
    with monkeypatch.context() as m:
        m.setattr(flexmerge.planning, "block_grams", lambda *a, **k: pytest.fail("planned a 1x merge"))
        fast = flexmerge.merge_to_disk(tasks, tmp_path / "fast", size=1.0, method=method, params=params)
    with monkeypatch.context() as m:
        _planned_always(m)
        slow = flexmerge.merge_to_disk(tasks, tmp_path / "slow", size=1.0, method=method, params=params)
    assert json.dumps(fast, sort_keys=True) == json.dumps(slow, sort_keys=True)
    a, b = flexmerge.load(tmp_path / "fast"), flexmerge.load(tmp_path / "slow")
    for t in tasks.names:
        sa, sb = a.state_dict(t), b.state_dict(t)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_size_above_the_last_point_is_planned(tasks):
    import flexmerge
    from flexmerge.planning import cuts_at_last_point

    partition = flexmerge.discover_blocks(tasks)
    from flexmerge.methods import get_method

    ta, emr = get_method("task_arithmetic"), get_method("emr")
    smallest = min(partition.nbytes(tasks.meta))
    assert cuts_at_last_point(tasks, partition, ta, 1.0)
    assert cuts_at_last_point(tasks, partition, ta, 1.0 + 0.5 * smallest / tasks.mergeable_bytes())
    assert not cuts_at_last_point(tasks, partition, ta, 1.0 + smallest / tasks.mergeable_bytes())
    assert not cuts_at_last_point(tasks, partition, ta, 1.0, planner="cluster")
    assert not cuts_at_last_point(tasks, partition, emr, 1.0)  # masks: its points are not whole copies


def test_last_point_shortcut_still_rejects_bad_plan_options(tasks, tmp_path):
    import flexmerge
    from flexmerge.errors import UnknownNameError

    with pytest.raises(UnknownNameError):
        flexmerge.merge_to_disk(tasks, tmp_path / "x", size=1.0, linkage="median")
    with pytest.raises(UnknownNameError):
        flexmerge.merge_to_disk(tasks, tmp_path / "y", size=1.0, measure="manhattan")


def test_uses_key_grams_only_where_a_plan_reads_them():
    from flexmerge.api import uses_key_grams

    assert not uses_key_grams("task_arithmetic", size=1.0)  # the last point: no plan
    assert uses_key_grams("task_arithmetic", size=2.0) and uses_key_grams("task_arithmetic")
    assert uses_key_grams("task_arithmetic", size=1.0, planner="cluster")  # not a greedy order: planned
    assert uses_key_grams("task_arithmetic", size=1.0, max_bytes=10**9)
    assert uses_key_grams("emr", size=1.0)  # masks: a 1x EMR is planned
    assert not uses_key_grams("ties", size=2.0)  # its similarity is over the trimmed vectors


@pytest.mark.parametrize("method, params, size", [("task_arithmetic", {"lam": 1.0}, 1.0),
                                                  ("task_arithmetic", {"lam": 1.0}, 2.0), ("ties", {"keep": 0.3}, 2.0)])
def test_a_pass_without_key_grams_validates_and_merges_the_same(zoo, tmp_path, method, params, size):
    """Without the Gram product the pass learns the same (frozen keys, hashes, norms for its
    checks); a plan made anyway runs its own similarity pass, to the same path and bits."""
    import json

    import flexmerge

    base, models = zoo
    full = flexmerge.load_tasks(base, models)
    lean = flexmerge.load_tasks(base, models, key_grams=False)
    assert full.key_grams and lean.key_grams == {}
    assert (lean.mergeable, lean.frozen, lean.provenance) == (full.mergeable, full.frozen, full.provenance)
    for tasks, out in [(full, "full"), (lean, "lean")]:
        flexmerge.merge_to_disk(tasks, tmp_path / out, size=size, method=method, params=params)
    a, b = (json.loads((tmp_path / out / "manifest.json").read_text()) for out in ("full", "lean"))
    assert a["blocks"] == b["blocks"] and a["size"] == b["size"]
    _same_artifacts(flexmerge.load(tmp_path / "full"), flexmerge.load(tmp_path / "lean"), full.names)


def test_a_pass_without_key_grams_still_rejects_bad_models(zoo, tmp_path):
    import flexmerge
    from flexmerge.errors import CheckpointError
    from safetensors.torch import load_file, save_file

    base, models = zoo
    same = tmp_path / "same.safetensors"
    save_file(load_file(str(base)), str(same))
    with pytest.raises(CheckpointError, match="identical to the base"):
        flexmerge.load_tasks(base, {**models, "copy": same}, key_grams=False)
    far = {k: v * 10 if v.is_floating_point() else v for k, v in load_file(str(base)).items()}
    save_file(far, str(tmp_path / "far.safetensors"))
    with pytest.raises(CheckpointError, match="does not look like"):
        flexmerge.load_tasks(base, {**models, "far": tmp_path / "far.safetensors"}, key_grams=False)
    bad = load_file(str(next(iter(models.values()))))
    k = next(k for k, v in bad.items() if v.is_floating_point() and v.numel() > 1)
    bad[k].view(-1)[1] = float("nan")
    save_file(bad, str(tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError, match="NaN|finite"):
        flexmerge.load_tasks(base, {**models, "nan": tmp_path / "nan.safetensors"}, key_grams=False)


def _same_artifacts(a, b, names) -> None:
    for t in names:
        sa, sb = a.state_dict(t), b.state_dict(t)
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k].view(torch.uint8), sb[k].view(torch.uint8)) for k in sa), t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("method, params, size, granularity", [
    ("task_arithmetic", {"lam": 1.0}, 1.0, "sublayer"), ("average", {}, 1.0, "layer"),
    ("task_arithmetic", {"lam": 0.7, "convention": "sum"}, 2.0, "sublayer"),  # some blocks merged, some not
    ("task_arithmetic", {"lam": 1.0}, 1.0, "split:2"),  # row parts: the premerged keys are not used
])
def test_all_tasks_merge_in_the_validation_pass_gives_the_same_bits(tmp_path, dtype, method, params, size,
                                                                    granularity):
    import flexmerge
    from flexmerge.api import first_pass_for

    from .conftest import write_zoo

    base, models = write_zoo(tmp_path / "zoo", dtype=dtype)
    plain = flexmerge.load_tasks(base, models)
    observed = flexmerge.load_tasks(base, models, observers=first_pass_for(method, params))
    kept = observed.first_pass["all_tasks_merge"]["tensors"]
    assert set(kept) == set(observed.mergeable)  # the frozen embedding is not kept
    for tasks, out in [(plain, "plain"), (observed, "observed")]:
        flexmerge.merge_to_disk(tasks, tmp_path / out, size=size, method=method, params=params,
                                granularity=granularity)
    _same_artifacts(flexmerge.load(tmp_path / "plain"), flexmerge.load(tmp_path / "observed"), plain.names)


def test_all_tasks_merge_is_used_and_respects_its_budget(zoo, tmp_path, monkeypatch):
    import flexmerge
    from flexmerge.api import first_pass_for
    from flexmerge.flexmodel import materialize

    base, models = zoo
    assert flexmerge.load_tasks(base, models, observers=first_pass_for("task_arithmetic", budget_bytes=1)).first_pass == {}
    assert first_pass_for("ties") != [] and first_pass_for("emr") == []
    assert first_pass_for("task_arithmetic", merging=False) == []  # a plan alone does not keep a merge
    tasks = flexmerge.load_tasks(base, models, observers=first_pass_for("task_arithmetic"))
    monkeypatch.setattr(materialize, "_member_deltas", lambda *a, **k: pytest.fail("read the inputs again"))
    flexmerge.merge_to_disk(tasks, tmp_path / "x", size=1.0)


@pytest.mark.parametrize("params", [{"keep": 0.2}, {"keep": 0.05, "trim": "exact"}])
def test_trim_histogram_from_the_validation_pass_gives_the_same_thresholds(zoo, tmp_path, params):
    import flexmerge
    from flexmerge.api import first_pass_for
    from flexmerge.preprocess import fitted_pipeline
    from flexmerge.methods import get_method

    base, models = zoo
    plain = flexmerge.load_tasks(base, models)
    observed = flexmerge.load_tasks(base, models, observers=first_pass_for("ties", params))
    assert plain.frozen  # frozen keys are counted as zeros by the pass, and taken out again
    tau = torch.cat([(load_file(models[t])[k].float() - load_file(base)[k].float()).view(-1)
                     for t in plain.names for k in plain.mergeable]).view(len(plain.names), -1)
    bins = (tau.view(torch.int32) & 0x7FFFFFFF) >> 16
    expected = torch.stack([torch.bincount(r, minlength=1 << 15) for r in bins])
    assert torch.equal(observed.first_pass["magnitude_histogram"].view(len(plain.names), -1), expected)
    m = get_method("ties", **params)
    assert fitted_pipeline(plain, m).transforms[0].thresholds == fitted_pipeline(observed, m).transforms[0].thresholds
    for tasks, out in [(plain, "plain"), (observed, "observed")]:
        flexmerge.merge_to_disk(tasks, tmp_path / out, size=1.5, method="ties", params=params)
    _same_artifacts(flexmerge.load(tmp_path / "plain"), flexmerge.load(tmp_path / "observed"), plain.names)
