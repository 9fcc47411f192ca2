"""Every method's 1x model against an independent formula written here from the reference code
(FusionBench 0.2.33, the methods' authors' code), on a multi-tensor model whose blocks hold
several tensors of different sizes: at 1x each block is one group of all tasks."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import flexmerge

RTOL = 1e-6


def _models(zoo):
    base, models = zoo
    return load_file(base), [load_file(p) for p in models.values()]


def _one_model(tasks, method, **params):
    """The end of the path: every block one group of all tasks (1x; above for mask methods; for
    twin, whose fused 1-D blocks cost more than copies, the last point is not the smallest)."""
    from flexmerge.flexmodel.materialize import materialize

    path = flexmerge.plan(tasks, method=method, params=params)
    flex = materialize(tasks, flexmerge.discover_blocks(tasks), path.assignment(len(path.steps)),
                       flexmerge.get_method(method, **params))
    assert all(len(groups) == 1 for groups in flex.assignment.groups)
    return [flex.state_dict(t) for t in tasks.names]


def _blocks(tasks):
    """Keys per block, as the default (sublayer) partition groups them."""
    return [[p.key for p in b.parts] for b in flexmerge.discover_blocks(tasks).blocks]


def _close(actual, expected, base, what):
    """|merged − formula| within RTOL of the task vector, plus the fp32 rounding of storing θ0 + τ."""
    allowed = RTOL * float(expected.abs().max()) + 2.0 ** -23 * float((base.double() + expected).abs().max())
    err = float((actual.double() - expected.double()).abs().max())
    assert err <= allowed, (what, err, allowed)


def _check(tasks, zoo, method, expected_delta, dtype=torch.float64, **params):
    """`expected_delta(taus per key of one block, keys) -> {key: merged τ}`, compared for every task.

    SVD-based formulas run in fp32, as the reference does on fp32 models (a float64 SVD differs
    from any fp32 one by about 1e-6 relative)."""
    base, fts = _models(zoo)
    merged = _one_model(tasks, method, **params)
    for keys in _blocks(tasks):
        taus = {k: torch.stack([ft[k] - base[k] for ft in fts]).to(dtype) for k in keys}
        want = expected_delta(taus, keys)
        for t, sd in enumerate(merged):
            for k in keys:
                w = want[k][t] if isinstance(want[k], list) else want[k]
                _close(sd[k].double() - base[k].double(), w.double(), base[k], (method, k, t))


def _mean_running(x):  # FusionBench's running mean for non-2-D tensors
    m = x[0].clone()
    for i in range(1, len(x)):
        m = m + (x[i] - m) / (i + 1)
    return m


def _orthogonal(x):
    """The nearest matrix with orthonormal columns (rows): P·Qᵀ of x's SVD P·Σ·Qᵀ."""
    p, _, q = torch.linalg.svd(x, full_matrices=False)
    return p @ q


def test_tsv_equals_fusionbench(tasks, zoo):
    def expected(taus, keys):
        out = {}
        for k, tv in taus.items():
            if tv.dim() != 3:
                out[k] = 0.7 * _mean_running(tv)
                continue
            n, m, c = tv.shape
            r = min(m, c) // n
            us, ss, vs = [], [], []
            for t in range(n):
                u, s, vh = torch.linalg.svd(tv[t])
                us.append(u[:, :r])
                ss.append(s[:r])
                vs.append(vh[:r])
            pad = min(m, c) - n * r
            U = torch.cat([*us, torch.zeros(m, pad, dtype=tv.dtype)], 1)
            S = torch.cat([*ss, torch.zeros(pad, dtype=tv.dtype)])
            V = torch.cat([*vs, torch.zeros(pad, c, dtype=tv.dtype)], 0)
            out[k] = 0.7 * _orthogonal(U) @ torch.diag(S) @ _orthogonal(V)
        return out
    _check(tasks, zoo, "tsv", expected, torch.float32, alpha=0.7)


def test_iso_c_equals_fusionbench(tasks, zoo):
    def expected(taus, keys):
        out = {}
        for k, tv in taus.items():
            total = tv.sum(0)
            if tv.dim() != 3:
                out[k] = 1.5 * total / tv.shape[0]
                continue
            u, s, vh = torch.linalg.svd(total, full_matrices=False)
            out[k] = 1.5 * s.mean() * (u @ vh)
        return out
    _check(tasks, zoo, "iso_c", expected, torch.float32, scaling_factor=1.5)


@pytest.mark.parametrize("fraction", [0.8, 0.5])
def test_iso_cts_equals_fusionbench(tasks, zoo, fraction):
    def expected(taus, keys):
        out = {}
        for k, tv in taus.items():
            if tv.dim() != 3:
                out[k] = 1.2 * _mean_running(tv)
                continue
            n, m, cols = tv.shape
            dims = min(m, cols)
            common = dims - round((dims - int(dims * fraction)) / n) * n
            per_task = (dims - common) // n
            u, s, vh = torch.linalg.svd(tv.sum(0), full_matrices=False)
            uc = u[:, :common]
            us, ss, vs = [], [], []
            for t in range(n):
                residual = tv[t] - (uc @ uc.T) @ tv[t]  # the association FusionBench evaluates
                ut, st, vt = torch.linalg.svd(residual, full_matrices=False)
                us.append(ut[:, :per_task])
                ss.append(st[:per_task])
                vs.append(vt[:per_task])
            U = torch.cat([*us, uc], 1)
            S = torch.cat([*ss, s[:common]])
            V = torch.cat([*vs, vh[:common]], 0)
            out[k] = 1.2 * S.mean() * _orthogonal(U) @ _orthogonal(V)
        return out
    _check(tasks, zoo, "iso_cts", expected, torch.float32, scaling_factor=1.2, common_space_fraction=fraction)


@pytest.mark.parametrize("rescale", ["tensor_means", "entries"])
def test_emr_equals_the_authors_code(tasks, zoo, rescale):
    """Elected sign of the sum (0 -> −), unified = max agreeing magnitude, masks τ_t·τ_uni > 0;
    rescaler Σ_tensors mean|τ_t| / Σ_tensors mean|m_t ⊙ τ_uni| (authors' code) or the ratio of sums
    over all entries of the block (the paper)."""
    def expected(taus, keys):
        n = next(iter(taus.values())).shape[0]
        unified, masks = {}, {}
        for k, tv in taus.items():
            sign = torch.where(tv.sum(0) > 0, 1.0, -1.0).double()
            agree = tv * sign > 0
            unified[k] = (tv.abs() * agree).amax(0) * sign
            masks[k] = (tv * unified[k]) > 0
        stat = (lambda x: x.mean()) if rescale == "tensor_means" else (lambda x: x.sum())
        scales = [sum(stat(taus[k][t].abs()) for k in keys) / sum(stat((masks[k][t] * unified[k]).abs()) for k in keys)
                  for t in range(n)]
        return {k: [scales[t] * masks[k][t] * unified[k] for t in range(n)] for k in keys}
    _check(tasks, zoo, "emr", expected, rescale=rescale)


def _pcb_clamp(x, low, high):  # the PCB authors' clamp: per row, between two sorted positions
    d = x.shape[1]
    s = torch.sort(x, dim=1).values
    return torch.clamp(x, s[:, int(d * low)].unsqueeze(1), s[:, int(d * (1 - high) - 1)].unsqueeze(1))


def _pcb_normalize(x):
    lo, hi = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
    return (x - lo) / (hi - lo)


@pytest.mark.parametrize("inter", ["tanh", "softmax"])
def test_pcb_equals_the_authors_code(tasks, zoo, inter):
    """PCB_merge of the authors' code on the block's flattened task vectors (inter='softmax': the paper)."""
    ratio, lam = 0.2, 1.3

    def expected(taus, keys):
        flat = torch.cat([taus[k].flatten(1) for k in keys], 1)
        n = flat.shape[0]
        magnitude = _pcb_clamp(flat.abs(), 1e-4, 1e-4)
        clipped = torch.sign(flat) * magnitude
        intra = torch.exp(n * _pcb_normalize(magnitude) ** 2)
        cross = flat * flat.sum(0)
        inter_b = torch.tanh(cross) if inter == "tanh" else torch.softmax(cross, dim=0)
        scale = _pcb_normalize(_pcb_clamp(intra * inter_b, 1 - ratio, 0))
        merged = lam * (clipped * scale).sum(0) / torch.clamp(scale.sum(0), min=1e-12)
        sizes = [taus[k][0].numel() for k in keys]
        return {k: piece.view_as(taus[k][0]) for k, piece in zip(keys, merged.split(sizes))}
    _check(tasks, zoo, "pcb", expected, ratio=ratio, lam=lam, inter=inter)


@pytest.mark.parametrize("base_method, mask_source", [("task_arithmetic", "trimmed"), ("ties", "trimmed"),
                                                      ("ties", "finetuned")])
def test_consensus_equals_tall_masks(tasks, zoo, base_method, mask_source):
    """TALL masks |τ_t| > λc·|τ_MTL − τ_t| (strict), over λ·Σ τ (TA) or the TIES vector; with
    mask_source='finetuned' the masks compare the untrimmed task vectors (TALL's definition)."""
    base, fts = _models(zoo)
    keep, lam, lam_c = 0.2, 0.8, 0.4
    keys = [k for k in base if any(not torch.equal(ft[k], base[k]) for ft in fts)]
    raw = torch.stack([torch.cat([(ft[k] - base[k]).flatten() for k in keys]) for ft in fts]).double()
    trimmed = raw
    if base_method == "ties":
        d = raw.shape[1]
        kth = raw.abs().kthvalue(d - int(d * keep), dim=1, keepdim=True).values
        trimmed = raw * (raw.abs() >= kth)
    offsets = dict(zip(keys, torch.tensor([0] + [base[k].numel() for k in keys]).cumsum(0).tolist()))

    def expected(taus, block_keys):
        cols = torch.cat([torch.arange(offsets[k], offsets[k] + base[k].numel()) for k in block_keys])
        t = trimmed[:, cols]
        if base_method == "ties":
            sign = torch.where(t.sum(0) >= 0, 1.0, -1.0).double()
            agree = torch.where(sign > 0, t > 0, t < 0)
            merged = lam * (t * agree).sum(0) / agree.sum(0).clamp(min=1)
        else:
            merged = lam * t.sum(0)
        source = raw[:, cols] if mask_source == "finetuned" else t
        masks = source.abs() > lam_c * (merged - source).abs()
        sizes = [base[k].numel() for k in block_keys]
        per_task = [(masks[i] * merged).split(sizes) for i in range(t.shape[0])]
        return {k: [per_task[i][j].view_as(base[k]) for i in range(t.shape[0])] for j, k in enumerate(block_keys)}
    _check(tasks, zoo, "consensus", expected, base=base_method, mask_source=mask_source, keep=keep, lam=lam,
           lam_c=lam_c)


@pytest.mark.parametrize("density", [0.1, 0.5])
def test_twin_equals_twin_merging_code(tasks, zoo, density):
    """Twin-Merging's code: θ* = θ0 + 0.3·Σ τ (twin_merge.yml); task t adds `sparsify.svd(θ_t − θ*)`:
    U, S, Vh = svd(x, full_matrices=True), r = int(density·len(S)), U[:, :r] diag(S[:r]) Vh[:r];
    1-D tensors unchanged."""
    def twin_svd(x):
        if x.dim() == 1:
            return x
        u, s, vh = torch.linalg.svd(x, full_matrices=True)
        r = int(density * len(s))
        return u[:, :r] @ torch.diag(s[:r]) @ vh[:r, :]

    def expected(taus, keys):
        out = {}
        for k in keys:
            shared = 0.3 * taus[k].sum(0)
            out[k] = [shared + twin_svd(tau - shared) for tau in taus[k]]
        return out

    _check(tasks, zoo, "twin", expected, dtype=torch.float32, density=density)
