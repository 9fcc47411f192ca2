"""The greedy path equals a slow, obviously-correct oracle; orders, baselines, cuts and sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flexmerge
from flexmerge.errors import SizeError, UnknownNameError
from flexmerge.methods import get_method
from flexmerge.planning import MergePath
from flexmerge.planning.greedy import ConstituentLinkage, run_greedy
from flexmerge.similarity import block_deltas

AGG = {"min": min, "max": max, "avg": lambda v: sum(v) / len(v)}


def _oracle(num_blocks, num_tasks, pair_score):
    """Recompute every pair of every block at every step; first maximum wins."""
    groups = [[(t,) for t in range(num_tasks)] for _ in range(num_blocks)]
    steps = []
    while any(len(g) > 1 for g in groups):
        best = None
        for b in range(num_blocks):
            gs = sorted(groups[b], key=min)
            for x in range(len(gs)):
                for y in range(x + 1, len(gs)):
                    s = pair_score(b, gs[x], gs[y])
                    if best is None or s > best[0]:
                        best = (s, b, gs[x], gs[y])
        s, b, left, right = best
        groups[b] = [g for g in groups[b] if g not in (left, right)] + [tuple(sorted(left + right))]
        steps.append((b, left, right, s))
    return steps


def _assert_same(fast, slow, rtol=1e-9):
    assert [(b, l, r) for b, l, r, _ in fast] == [(b, l, r) for b, l, r, _ in slow]
    np.testing.assert_allclose([s for *_, s in fast], [s for *_, s in slow], rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("linkage", ["min", "avg", "max"])
@pytest.mark.parametrize("seed", range(5))
def test_constituent_greedy_equals_oracle(linkage, seed):
    rng = np.random.default_rng(seed)
    num_blocks, m = 6, 7
    x = rng.normal(size=(num_blocks, m, 12))
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    cos = x @ x.transpose(0, 2, 1)
    fast = run_greedy(ConstituentLinkage(cos, linkage))
    slow = _oracle(num_blocks, m, lambda b, a, c: AGG[linkage]([cos[b, i, j] for i in a for j in c]))
    _assert_same(fast, slow)


def _vector_score(vectors, method, measure):
    def merged(b, g):
        d = vectors[b][list(g)]
        return d[0] if len(g) == 1 else method.merge(d).delta

    def score(b, a, c):
        u, v = merged(b, a).double(), merged(b, c).double()
        if measure == "sign":
            return float((torch.sign(u) == torch.sign(v)).double().mean())
        if measure == "euclidean":
            return -float((u - v).norm())
        return float(u @ v / (u.norm() * v.norm()))

    return score


@pytest.mark.parametrize("method, measure", [("task_arithmetic", "cosine"), ("task_arithmetic", "euclidean"),
                                             ("average", "cosine"), ("ties", "cosine"), ("emr", "euclidean"),
                                             ("ties", "sign")])
def test_merged_vector_mode_equals_oracle(tasks, method, measure):
    from flexmerge.preprocess import fitted_pipeline

    m = get_method(method)
    part = flexmerge.discover_blocks(tasks)
    path = flexmerge.plan(tasks, part, method=m, mode="merged", measure=measure)
    pipe = fitted_pipeline(tasks, m)
    vectors = [block_deltas(tasks, part, b, pipe) for b in range(len(part))]
    slow = _oracle(len(part), tasks.num_tasks, _vector_score(vectors, m, measure))
    fast = [(s.block, s.left, s.right, s.similarity) for s in path.steps]
    assert [(b, l, r) for b, l, r, _ in fast] == [(b, l, r) for b, l, r, _ in slow]
    np.testing.assert_allclose([s for *_, s in fast], [s for *_, s in slow], rtol=1e-5, atol=1e-6)


def test_plan_uses_block_cosines_of_the_task_vectors(tasks):
    part = flexmerge.discover_blocks(tasks)
    path = flexmerge.plan(tasks, part, linkage="min")
    vectors = [block_deltas(tasks, part, b) for b in range(len(part))]
    cos = np.stack([(torch.nn.functional.normalize(v.double(), dim=1) @ torch.nn.functional.normalize(
        v.double(), dim=1).T).numpy() for v in vectors])
    slow = _oracle(len(part), tasks.num_tasks, lambda b, a, c: min(cos[b, i, j] for i in a for j in c))
    # Gram matrices accumulate fp32 products (fast); the oracle is fp64 throughout.
    _assert_same([(s.block, s.left, s.right, s.similarity) for s in path.steps], slow, rtol=1e-5)


@pytest.mark.parametrize("order", ["left-right", "right-left"])
def test_block_orders(tasks, order):
    path = flexmerge.plan(tasks, planner=order)
    blocks = [s.block for s in path.steps]
    assert blocks == sorted(blocks, reverse=(order == "right-left"))
    assert len(path.steps) == len(path.block_names) * (tasks.num_tasks - 1)


def test_random_order_is_seeded(tasks):
    a = [s.block for s in flexmerge.plan(tasks, planner="random", seed=1).steps]
    b = [s.block for s in flexmerge.plan(tasks, planner="random", seed=1).steps]
    c = [s.block for s in flexmerge.plan(tasks, planner="random", seed=2).steps]
    assert a == b and a != c


@pytest.mark.parametrize("planner", ["channel", "cluster"])
def test_baselines_have_k_groups_per_block(tasks, planner):
    path = flexmerge.plan(tasks, planner=planner)
    m = tasks.num_tasks
    assert path.sizes == pytest.approx([float(k) for k in range(m, 0, -1)])
    for k in range(1, m + 1):
        a = path.cut(float(k))
        assert all(len(groups) == k for groups in a.groups)
        assert all(sorted(t for g in groups for t in g) == list(range(m)) for groups in a.groups)
    if planner == "cluster":
        assert len(set(path.cut(2.0).groups)) == 1  # one grouping for every block


def test_channel_kmeans_recovers_planted_clusters():
    from flexmerge.planning.baselines import spherical_kmeans

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 50))
    x = np.concatenate([c + 0.1 * rng.normal(size=(3, 50)) for c in centers])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = spherical_kmeans(x @ x.T, 3, np.random.default_rng(1))
    assert sorted(tuple(np.flatnonzero(labels == c)) for c in range(3)) == [(0, 1, 2), (3, 4, 5), (6, 7, 8)]


def test_sizes_cut_and_json_round_trip(tasks, tmp_path):
    path = flexmerge.plan(tasks, method="ties")
    assert path.sizes[0] == pytest.approx(tasks.num_tasks) and path.min_size == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(path.sizes, path.sizes[1:]))
    for size in [1.0, 1.5, 2.0, 3.3, 4.0]:
        p = path.point_at(size)
        assert path.sizes[p] <= size + 1e-9
        assert p == 0 or path.sizes[p - 1] > size
    path.save(tmp_path / "path.json")
    again = MergePath.load(tmp_path / "path.json")
    assert again.sizes == path.sizes
    for size in [1.0, 2.5, 4.0]:
        assert again.cut(size) == path.cut(size)


def test_mask_methods_have_a_minimum_size(tasks):
    path = flexmerge.plan(tasks, method="emr")
    # 1x for the unified vector + θ0 + 4 one-bit masks (1/32 of fp32 each) + 4 fp32 rescalers per block
    assert 2.125 < path.min_size < 2.15
    with pytest.raises(SizeError, match=r"size 1x is below the smallest size 2\.1\d+x that method 'emr' reaches"):
        path.cut(1.0)


def test_planner_option_errors(tasks):
    with pytest.raises(UnknownNameError, match="unknown planner 'best'; choose one of"):
        flexmerge.plan(tasks, planner="best")
    with pytest.raises(UnknownNameError, match="unknown linkage 'single'"):
        flexmerge.plan(tasks, linkage="single")


def test_grams_from_the_validation_pass_equal_a_fresh_streaming_pass(tasks, monkeypatch):
    from flexmerge import taskvec
    from flexmerge.similarity import block_grams

    part = flexmerge.discover_blocks(tasks)
    from_scan = block_grams(tasks, part)
    monkeypatch.setattr(tasks, "key_grams", {})
    monkeypatch.setattr(taskvec, "CHUNK_ELEMENTS", 64)
    streamed = block_grams(tasks, part)
    torch.testing.assert_close(from_scan, streamed, rtol=1e-5, atol=1e-9)
