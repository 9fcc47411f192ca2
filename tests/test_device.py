"""--device: planning and merging compute on a chosen device, results are written from the host.

These run on the CPU: device="cpu" gives the default's bits, a CUDA device that is not there is
a clear error, and a faked CUDA device (a counting stand-in for the one function that moves
tensors) shows that every chunk goes to the device and every result comes back."""

from __future__ import annotations

import sys

import pytest
import torch
from typer.testing import CliRunner

import flexmerge
from flexmerge import device as dev
from flexmerge import taskvec
from flexmerge.cli import app
from flexmerge.device import resolve_device
from flexmerge.errors import ConfigError
from flexmerge.methods import available_methods
from flexmerge.methods.base import MethodSpec, get_method

# every registered method, plus the variants that take other code paths (DARE, a per-tensor
# trim, the untransformed rows of consensus/twin, data-dependent twin ranks, the sparsifications of
# breadcrumbs and della, θ0 as a row), with the parameters that have no default
REQUIRED = {"slerp": "slerp:t=0.3", "nearswap": "nearswap:t=0.01"}
SPECS = [REQUIRED.get(n, n) for n in sorted(available_methods())] + [
    "ties:dare=0.3:trim_scope=tensor", "consensus:base=ties:mask_source=finetuned", "twin:base=ties",
    "twin:energy=0.9", "emr:rescale=entries", "pcb:inter=softmax", "breadcrumbs_ties:density=0.6:rescale=true",
    "della:density=0.5", "linear:normalize=false", "multislerp:space=weights"]


def _fake_cuda(monkeypatch, count: int = 1) -> list[tuple[tuple[int, ...], str]]:
    """CUDA 'available' with `count` devices, and moves recorded instead of made (the tensors stay
    on the CPU, so the arithmetic is the CPU's and the outputs must equal the default's)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    moves: list[tuple[tuple[int, ...], str]] = []
    monkeypatch.setattr(dev, "_move", lambda t, d: moves.append((tuple(t.shape), str(d))) or t)
    return moves


def _no_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _same_flex(a, b) -> None:
    assert a.size == b.size and a.stored_bytes() == b.stored_bytes() and a.assignment == b.assignment
    for t in a.tasks:
        sa, sb = a.state_dict(t), b.state_dict(t)
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), (t, k)


def test_resolve_device_names():
    assert resolve_device(None) == resolve_device("cpu") == resolve_device(" CPU ") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected  # on this machine: the CPU
    assert resolve_device("auto", "ray") == torch.device("cpu")  # Ray workers get no GPU


def test_resolve_device_errors_name_the_option(monkeypatch):
    for bad in ("gpu", "cuda:x", "cuda:", "mps", ""):
        with pytest.raises(ConfigError, match=r"unknown device .*--device.*auto, cpu, cuda, cuda:N"):
            resolve_device(bad)
    _no_cuda(monkeypatch)
    for absent in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match=r"--device.*CUDA is not available"):
            resolve_device(absent)
    assert resolve_device("auto") == torch.device("cpu")
    _fake_cuda(monkeypatch, count=2)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"'cuda:2' \(--device\) does not exist: this machine has 2 CUDA devices"):
        resolve_device("cuda:2")
    with pytest.raises(ConfigError, match="not supported with the Ray executor"):
        resolve_device("cuda", "ray")


@pytest.mark.parametrize("spec", SPECS)
def test_every_method_on_device_cpu_equals_the_default(zoo, spec):
    """Plan and merge through the public API with device="cpu" and without: the same path, the same bits."""
    base, models = zoo
    parsed = MethodSpec.parse(spec)
    name, params = parsed.name, dict(parsed.params)
    if get_method(name, **params).pairwise:
        models = dict(list(models.items())[:2])
    default_tasks, cpu_tasks = flexmerge.load_tasks(base, models), flexmerge.load_tasks(base, models)
    p0 = flexmerge.plan(default_tasks, method=name, params=params)
    p1 = flexmerge.plan(cpu_tasks, method=name, params=params, device="cpu")
    assert p0.steps == p1.steps and p0.sizes == p1.sizes
    for size in (p0.min_size, (p0.sizes[0] + p0.min_size) / 2):  # all merged; merged groups and copies
        _same_flex(flexmerge.materialize(default_tasks, p0, size),
                   flexmerge.materialize(cpu_tasks, p1, size, device="cpu"))


def test_similarity_matrices_are_identical_on_device_cpu(tasks):
    from flexmerge.preprocess import fitted_pipeline
    from flexmerge.similarity import block_grams

    partition = flexmerge.discover_blocks(tasks)
    for name in ("ties", "dare", "task_arithmetic"):
        pipeline = fitted_pipeline(tasks, get_method(name))
        default = block_grams(tasks, partition, pipeline)
        assert torch.equal(default, block_grams(tasks, partition, pipeline, device=torch.device("cpu")))
        assert default.device.type == "cpu" and default.dtype == torch.float64


def _chunks(tasks, block) -> int:
    return sum(1 for p in block.parts for _ in tasks.chunks(p.key, p.rows))


@pytest.mark.parametrize("executor", ["local", "threads"])
def test_every_chunk_goes_to_the_device_and_every_result_comes_back(zoo, monkeypatch, executor):
    """With a (faked) CUDA device: the trim-threshold pass, the similarity pass and merging move
    each chunk of task vectors to it, and each Gram matrix and merged group comes back to the
    host; the outputs equal the default's. Would fail if --device were ignored anywhere."""
    base, models = zoo
    monkeypatch.setattr(taskvec, "CHUNK_ELEMENTS", 100)  # several chunks per tensor
    default = flexmerge.merge(flexmerge.load_tasks(base, models), size=2, method="ties")
    tasks = flexmerge.load_tasks(base, models)
    moves = _fake_cuda(monkeypatch)
    on_gpu = flexmerge.merge(tasks, size=2, method="ties", device="cuda", executor=executor)
    _same_flex(default, on_gpu)
    assert on_gpu.info["device"] == "cuda:0" and "device" not in default.info

    partition = flexmerge.discover_blocks(tasks)
    chunks = [_chunks(tasks, b) for b in partition.blocks]
    threshold_pass = 2 * sum(1 for k in tasks.mergeable for _ in tasks.chunks(k))  # two streaming passes
    merged = [(b, g) for b, groups in enumerate(on_gpu.assignment.groups) for g in groups if len(g) > 1]
    to_gpu = [shape for shape, d in moves if d == "cuda:0"]
    to_host = [shape for shape, d in moves if d == "cpu"]
    assert len(to_gpu) == threshold_pass + sum(chunks) + sum(chunks[b] for b, _ in merged)
    assert sorted(s[0] for s in to_gpu[threshold_pass + sum(chunks):]) == sorted(
        len(g) for b, g in merged for _ in range(chunks[b]))  # a group's members, chunk by chunk
    assert len(to_host) == len(partition) + len(merged)  # the Gram matrices, the merged groups


def test_mask_and_residual_results_come_back_whole(zoo, monkeypatch):
    """EMR's masks and rescalers, Twin's residual factors: every tensor of a result returns."""
    from flexmerge.size import stored_with_masks

    base, models = zoo
    tasks = flexmerge.load_tasks(base, models)
    moves = _fake_cuda(monkeypatch)
    emr = flexmerge.merge(tasks, size=3, method="emr", device="cuda")
    # (no Gram matrices: without preprocessing they come from the validation pass, on the host)
    masked = sum(1 for groups in emr.assignment.groups for g in groups if stored_with_masks(emr_method(), len(g)))
    assert masked and sum(d == "cpu" for _, d in moves) == 3 * masked  # delta, masks, scales
    moves.clear()
    twin = flexmerge.merge(tasks, size=3, method="twin", device="cuda")
    expected = 0
    for b, groups in enumerate(twin.assignment.groups):
        views = twin.partition.blocks[b].views(tasks.meta)
        factors = sum(2 if len(v.shape) == 2 else 1 for v in views)  # a 2-D residual is two factors
        expected += sum(1 + len(g) * factors for g in groups if len(g) > 1)
    assert expected and sum(d == "cpu" for _, d in moves) == expected


def emr_method():
    return get_method("emr")


class _FactoryAudit(torch.overrides.TorchFunctionMode):
    """Records where a tensor factory is called without `device=` (on a GPU it would make a CPU
    tensor): the first flexmerge function up the stack that is not the scratch-buffer helper, as
    'module.function'."""

    FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.arange, torch.eye,
                 torch.rand, torch.randn, torch.linspace, torch.as_tensor}

    def __init__(self):
        super().__init__()
        self.missing: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES and kwargs.get("device") is None:
            frame = sys._getframe(1)
            while frame is not None and not (frame.f_globals.get("__name__", "").startswith("flexmerge")
                                             and frame.f_globals["__name__"] != "flexmerge._scratch"):
                frame = frame.f_back
            where = f"{frame.f_globals['__name__']}.{frame.f_code.co_name}" if frame else "?"
            self.missing.append(where)
        return func(*args, **kwargs)


@pytest.mark.parametrize("spec", SPECS)
def test_methods_create_their_tensors_on_the_inputs_device(spec):
    """No method makes a tensor without naming a device (on a GPU that tensor would be on the CPU)."""
    from flexmerge.blocks import PartView

    parsed = MethodSpec.parse(spec)
    name, params = parsed.name, dict(parsed.params)
    method = get_method(name, **params)
    g = torch.Generator().manual_seed(0)
    rows = (6 if method.uses_untransformed else 2 if method.pairwise else 3) + method.needs_base
    parts = [PartView("w", (8, 5)), PartView("b", (8,))]
    chunks = [(0, torch.randn(rows, 40, generator=g)), (1, torch.randn(rows, 8, generator=g))]
    audit = _FactoryAudit()
    with audit:
        method.merge_chunks(chunks, parts)
    assert audit.missing == []


def test_transforms_and_threshold_pass_create_their_tensors_on_the_chunks_device(tasks, monkeypatch):
    from flexmerge.preprocess import DareDrop, Pipeline, TopKTrim

    monkeypatch.setattr(taskvec, "CHUNK_ELEMENTS", 100)  # the two-pass radix selection
    audit = _FactoryAudit()
    with audit:
        pipeline = Pipeline([DareDrop(0.3, 1), TopKTrim(0.2)]).fit(tasks, torch.device("cpu"))
        for key in tasks.mergeable[:3]:
            for c in tasks.chunks(key):
                pipeline.deltas(tasks, c, device=torch.device("cpu"))
    # host-side: reading checkpoints, the buffer a chunk is read into before it moves (`stream`), and
    # the thresholds (host numbers; one small tensor, moved with each chunk)
    host = ("flexmerge.taskvec.", "flexmerge.io.", "flexmerge.preprocess.stream", "flexmerge.preprocess._bit_patterns")
    assert audit.missing and [m for m in audit.missing if not m.startswith(host)] == []


def test_cli_refuses_an_absent_or_unknown_device_before_reading_models(zoo, tmp_path, monkeypatch):
    base, models = zoo
    flags = ["--base", str(base)] + [x for n, p in models.items() for x in ("--model", f"{n}={p}")]
    runner = CliRunner()
    _no_cuda(monkeypatch)
    read = []
    monkeypatch.setattr(taskvec, "load_tasks", lambda *a, **k: read.append(1))
    for cmd in (["merge", "--size", "2", "--out", str(tmp_path / "m")], ["plan", "--out", str(tmp_path / "p.json")]):
        r = runner.invoke(app, [*cmd, *flags, "--device", "cuda"])
        assert r.exit_code == 2 and "--device" in r.output and "CUDA is not available" in r.output, r.output
        r = runner.invoke(app, [*cmd, *flags, "--device", "tpu"])
        assert r.exit_code == 2 and "unknown device 'tpu'" in r.output, r.output
    config = tmp_path / "merge.yaml"
    config.write_text(f"base: {base}\nmodels:\n" + "".join(f"  {n}: {p}\n" for n, p in models.items())
                      + "size: 2\ndevice: cuda:1\n")
    r = runner.invoke(app, ["merge", "--config", str(config), "--out", str(tmp_path / "m")])
    assert r.exit_code == 2 and "device 'cuda:1' (--device)" in r.output, r.output
    r = runner.invoke(app, ["merge", *flags, "--size", "2", "--executor", "ray", "--device", "cuda",
                            "--out", str(tmp_path / "m")])
    assert r.exit_code == 2 and "Ray executor" in r.output, r.output
    r = runner.invoke(app, ["sweep", *flags, "--evaluator", "x:y", "--device", "cuda", "--out", str(tmp_path / "s")])
    assert r.exit_code == 2 and "CUDA is not available" in r.output, r.output
    r = runner.invoke(app, ["sweep", "--suite", "digits", "--device", "cpu", "--out", str(tmp_path / "s")])
    assert r.exit_code == 2 and "--device go with your own models" in r.output, r.output
    assert read == [] and not (tmp_path / "m").exists()


def test_cli_merge_on_device_cpu_writes_the_default_artifact(zoo, tmp_path):
    base, models = zoo
    flags = ["--base", str(base), "--method", "ties", "--size", "2"]
    flags += [x for n, p in models.items() for x in ("--model", f"{n}={p}")]
    runner = CliRunner()
    assert runner.invoke(app, ["merge", *flags, "--out", str(tmp_path / "a")]).exit_code == 0
    r = runner.invoke(app, ["merge", *flags, "--device", "auto", "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    if not torch.cuda.is_available():  # auto is the CPU here: the same files, byte for byte
        names = sorted(p.name for p in (tmp_path / "a").iterdir())
        assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
        for n in names:
            assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n


def test_own_model_sweep_plans_and_merges_on_the_device(tasks, monkeypatch):
    """`flexmerge sweep --device` for own models: curve.sweep threads it to planning and merging."""
    from flexmerge.curve import sweep

    def score(task, state):
        return float(sum(v.double().sum() for v in state.values()))

    default = sweep(tasks, score, methods=["ties"], sizes=[2])
    moves = _fake_cuda(monkeypatch)
    on_gpu = sweep(tasks, score, methods=["ties"], sizes=[2], device="cuda")
    assert [r.accuracy for r in on_gpu.records] == [r.accuracy for r in default.records]
    assert any(d == "cuda:0" for _, d in moves) and any(d == "cpu" for _, d in moves)


def test_a_gpu_merge_to_disk_names_its_device_and_is_its_own_job(zoo, tmp_path, monkeypatch):
    """The artifact says where it was merged; a CPU job's key (and manifest) are as before."""
    from flexmerge.flexmodel.format import ArtifactHeader
    from flexmerge.flexmodel.read import read_manifest

    keys, real = [], ArtifactHeader.job_key
    monkeypatch.setattr(ArtifactHeader, "job_key", lambda self, frozen: keys.append(real(self, frozen)) or keys[-1])
    base, models = zoo
    tasks = flexmerge.load_tasks(base, models)
    flexmerge.merge_to_disk(tasks, tmp_path / "cpu", size=2, method="ties")
    _fake_cuda(monkeypatch)
    flexmerge.merge_to_disk(tasks, tmp_path / "gpu", size=2, method="ties", device="cuda")
    cpu, gpu = read_manifest(tmp_path / "cpu"), read_manifest(tmp_path / "gpu")
    assert "device" not in cpu["info"] and gpu["info"]["device"] == "cuda:0"
    assert cpu["shards"] == gpu["shards"]  # the same bytes (the fake device computes on the CPU)
    assert len(keys) == 2 and keys[0] != keys[1]  # a partial CPU merge does not resume on the GPU
