"""Twin-Merging (`twin`): shared vector + per-task truncated-SVD residuals, checked against formulas
computed here from the checkpoint files themselves."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import flexmerge
from flexmerge.curve import sweep
from flexmerge.cli import app
from flexmerge.errors import ConfigError
from flexmerge.flexmodel.materialize import materialize
from flexmerge.blocks import PartView
from flexmerge.methods import MethodSpec, get_method
from tests.test_artifact import _stored_bytes_on_disk

FULL_RANK_ATOL = 1e-5  # fp32 SVD of ~0.05-sized 48x16 residuals: the observed error is ~2e-7
BLOCK = "layers.0.mlp"  # fc1 (32, 16) and fc2 (16, 32): two 2-D tensors


def _all_merged(tasks, **params):
    """Every block one group of all tasks: Twin-Merging itself (the path's last point)."""
    method = get_method("twin", **params)
    path = flexmerge.plan(tasks, method=method)
    return materialize(tasks, flexmerge.discover_blocks(tasks), path.assignment(len(path.steps)), method), path


def _task_vectors(zoo) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    base, models = zoo
    theta0 = load_file(base)
    return theta0, [{k: v - theta0[k] for k, v in load_file(p).items()} for p in models.values()]


def _rank_k(x: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


@pytest.mark.parametrize("base", ["task_arithmetic", "ties"])
def test_full_rank_reconstructs_every_task(zoo, tasks, tmp_path, base):
    flex, _ = _all_merged(tasks, rank=10_000, base=base)
    flexmerge.save(flex, tmp_path / "twin")
    loaded = flexmerge.load(tmp_path / "twin")
    for t, (name, path) in enumerate(zoo[1].items()):
        want = load_file(path)
        for got in (flex.state_dict(name), loaded.state_dict(name)):
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=0, atol=FULL_RANK_ATOL)
        exported = load_file(flexmerge.export(loaded, name, tmp_path / f"{name}.safetensors"))
        assert all(torch.allclose(exported[k], want[k], rtol=0, atol=FULL_RANK_ATOL) for k in want)


@pytest.mark.parametrize("rank", [1, 3])
def test_rank_k_factors_are_the_truncated_svd_of_the_residual(zoo, tasks, rank):
    flex, _ = _all_merged(tasks, rank=rank)
    theta0, tvs = _task_vectors(zoo)
    b = flex.partition.names().index(BLOCK)
    (group,) = flex.blocks[b].groups
    assert group.members == (0, 1, 2, 3)
    for p, part in enumerate(flex.partition.blocks[b].parts):
        shared = 0.3 * sum(tv[part.key] for tv in tvs)  # Twin-Merging's task arithmetic: 0.3 · Σ τ
        torch.testing.assert_close(group.tensors[p], theta0[part.key] + shared)
        for t, tv in enumerate(tvs):
            a, bb = group.residuals[t][p]
            assert a.shape == (tv[part.key].shape[0], rank) and bb.shape == (rank, tv[part.key].shape[1])
            torch.testing.assert_close(a @ bb, _rank_k(tv[part.key] - shared, rank), rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(flex.state_dict(flex.tasks[t])[part.key],
                                       theta0[part.key] + shared + _rank_k(tv[part.key] - shared, rank))


def test_one_dimensional_tensors_keep_their_exact_residual(zoo, tasks):
    flex, _ = _all_merged(tasks, rank=1)
    theta0, tvs = _task_vectors(zoo)
    key = "layers.1.norm1.weight"
    b = next(i for i, blk in enumerate(flex.partition.blocks) if blk.parts[0].key == key)
    (group,) = flex.blocks[b].groups
    shared = 0.3 * sum(tv[key] for tv in tvs)
    for t, tv in enumerate(tvs):
        (r,) = group.residuals[t][0]
        torch.testing.assert_close(r, tv[key] - shared)
        torch.testing.assert_close(flex.state_dict(f"task{t}")[key], theta0[key] + tv[key])


def test_energy_picks_the_smallest_rank_holding_the_energy(zoo, tasks, tmp_path):
    energy = 0.8
    flex, path = _all_merged(tasks, energy=energy)
    _, tvs = _task_vectors(zoo)
    b = flex.partition.names().index(BLOCK)
    (group,) = flex.blocks[b].groups
    for p, part in enumerate(flex.partition.blocks[b].parts):
        shared = 0.3 * sum(tv[part.key] for tv in tvs)
        for t, tv in enumerate(tvs):
            s2 = torch.linalg.svdvals((tv[part.key] - shared).double()) ** 2
            want = next(r for r in range(1, len(s2) + 1) if s2[:r].sum() >= energy * s2.sum())
            assert 1 < want < len(s2)  # the rule is exercised, not a boundary case
            assert group.residuals[t][p][0].shape[1] == want
    # the rank depends on the data: the planned size bounds it, the model's size is what is stored
    assert flex.size < path.sizes[-1]
    flexmerge.save(flex, tmp_path / "e")
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert _stored_bytes_on_disk(tmp_path / "e") == manifest["stored_bytes"] == flex.stored_bytes()
    assert manifest["size"] == pytest.approx(flex.stored_bytes() / tasks.mergeable_bytes(), rel=1e-12) == flex.size


def test_size_model_counts_shared_copy_plus_factors(tasks, tmp_path):
    """All merged at rank r: per block one copy, plus per task r·(m+n) per 2-D tensor and every
    entry of the others; a group of one is a plain copy (the path starts at exactly M)."""
    rank = 2
    flex, path = _all_merged(tasks, rank=rank)
    entries = 0
    for key in tasks.mergeable:
        shape = tasks.meta[key].shape
        own = rank * (shape[0] + shape[1]) if len(shape) == 2 else shape[0]
        entries += (shape[0] * (shape[1] if len(shape) == 2 else 1)) + tasks.num_tasks * own
    assert path.sizes[0] == tasks.num_tasks
    assert path.sizes[-1] == pytest.approx(entries * 4 / tasks.mergeable_bytes(), rel=1e-12) == flex.size
    flexmerge.merge_to_disk(tasks, tmp_path / "d", size=2.0, method="twin", params={"rank": rank})
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert _stored_bytes_on_disk(tmp_path / "d") == manifest["stored_bytes"]
    assert manifest["size"] == pytest.approx(manifest["stored_bytes"] / tasks.mergeable_bytes(), rel=1e-12)
    assert manifest["size"] <= 2.0


def test_half_precision_storage_streams_and_is_accounted(tasks, tmp_path):
    params = {"rank": 2, "dtype": "bfloat16"}
    flexmerge.merge_to_disk(tasks, tmp_path / "bf16", size=2.5, method="twin", params=params, shard_bytes=1)
    streamed = flexmerge.load(tmp_path / "bf16")
    in_memory = flexmerge.merge(tasks, size=2.5, method="twin", params=params)
    assert streamed.stored_bytes() == in_memory.stored_bytes() == _stored_bytes_on_disk(tmp_path / "bf16")
    assert streamed.size == pytest.approx(in_memory.size, rel=1e-12)
    assert any(g.residuals for blk in streamed.blocks for g in blk.groups)
    for g in (g for blk in streamed.blocks for g in blk.groups if g.residuals):
        assert all(f.dtype == torch.bfloat16 for m in g.residuals for r in m for f in r)
    for t in tasks.names:
        a, b = streamed.state_dict(t), in_memory.state_dict(t)
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert all(v.dtype == torch.bfloat16 for k, v in a.items() if k in tasks.mergeable)


def test_per_task_modules_differ_where_residuals_are_stored(tasks):
    flex = flexmerge.merge(tasks, size=2.0, method="twin", params={"rank": 1})
    a, b = flex.state_dict("task0"), flex.state_dict("task1")
    merged = [k for k in tasks.mergeable if any(g.residuals for g in flex.blocks[_block_of(flex, k)].groups)]
    assert merged and all(not torch.equal(a[k], b[k]) for k in merged)


def _block_of(flex, key: str) -> int:
    return next(i for i, blk in enumerate(flex.partition.blocks) if any(p.key == key for p in blk.parts))


@pytest.mark.parametrize("params, message", [
    ({"rank": -1}, "rank: Input should be greater than or equal to 0"),
    ({"rank": 2, "energy": 0.9}, "give one of rank, density and energy, not rank and energy"),
    ({"energy": 0.0}, "energy: Input should be greater than 0"),
    ({"energy": 1.5}, "energy: Input should be less than or equal to 1"),
    ({"density": 2}, "density: Input should be less than or equal to 1"),
    ({"base": "pcb"}, "base: Input should be 'task_arithmetic' or 'ties'"),
    ({"ranks": 3}, "ranks: Extra inputs are not permitted"),
])
def test_bad_parameters_are_clear_errors(params, message):
    with pytest.raises(ConfigError, match=f"invalid parameters for method 'twin': .*{message}"):
        get_method("twin", **params)


def test_method_specs_and_sweep_at_several_ranks(tasks):
    assert MethodSpec.parse("twin:rank=4:base=ties") == MethodSpec("twin", {"rank": 4, "base": "ties"})
    assert MethodSpec.parse("ties") == MethodSpec("ties", {})
    with pytest.raises(ConfigError, match="'rank4' is not key=value"):
        MethodSpec.parse("twin:rank4")
    seen: dict[str, int] = {}
    result = sweep(tasks, lambda t, sd: float(sd["layers.0.mlp.fc1.weight"].sum()),
                   methods=["task_arithmetic", "twin:rank=1", "twin:rank=4"], sizes=[2.0, 3.0])
    curves = result.curves()
    assert set(curves) == {"task_arithmetic", "twin:rank=1", "twin:rank=4"}
    for r in result.records:
        seen[r.method] = seen.get(r.method, 0) + 1
    assert seen == {m: 2 * tasks.num_tasks for m in curves}
    assert curves["twin:rank=1"] != curves["twin:rank=4"]


def test_cli_merge_with_twin_params(zoo, tmp_path):
    base, models = zoo
    flags = [x for name, p in models.items() for x in ("--model", f"{name}={p}")]
    r = CliRunner().invoke(app, ["merge", "--base", str(base), *flags, "--method", "twin", "--param", "rank=2",
                                 "--size", "2", "--out", str(tmp_path / "flex")])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "flex" / "manifest.json").read_text())
    assert manifest["method"]["name"] == "twin" and manifest["method"]["rank"] == 2 and manifest["size"] <= 2
    r = CliRunner().invoke(app, ["merge", "--base", str(base), *flags, "--method", "twin", "--param", "rank=-2",
                                 "--size", "2", "--out", str(tmp_path / "bad")])
    assert r.exit_code != 0 and "rank" in r.output


def test_router_learns_separable_synthetic_features():
    from flexmerge.routing import fit_router, route_weights

    g = torch.Generator().manual_seed(0)
    centers = 4 * torch.randn(4, 16, generator=g)
    labels = torch.arange(4).repeat_interleave(50)
    x = centers[labels] + torch.randn(200, 16, generator=g)
    router = fit_router(x, labels, 4, epochs=30, batch_size=64)
    test_labels = torch.arange(4).repeat_interleave(25)
    test = centers[test_labels] + torch.randn(100, 16, generator=g)
    w = route_weights(router, test)
    assert torch.equal(w.argmax(-1), test_labels)
    torch.testing.assert_close(w.sum(-1), torch.ones(100))
    with pytest.raises(ConfigError, match=r"must cover every task 0..4 and no other; missing: \[4\]"):
        fit_router(x, labels, 5)


def test_merged_vector_planning_compares_shared_vectors(tasks):
    """In merged-vector mode a twin group's vector is its shared vector (TIES-trimmed rows only)."""
    method = get_method("twin", rank=2, base="ties")
    d = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(method.merge_flat(d, [PartView("w", (5, 10))]).delta, method.shared(d))
    path = flexmerge.plan(tasks, method=method, mode="merged")
    assert path.num_points == flexmerge.plan(tasks, method=method).num_points
    flex = flexmerge.materialize(tasks, path, 2.0)
    assert flex.size <= 2.0 and any(g.residuals for b in flex.blocks for g in b.groups)
