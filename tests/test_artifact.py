"""The artifact: Mx is exact, sizes equal stored bytes, round trips, corruption, atomic writes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import flexmerge
from flexmerge.errors import ArtifactError, FlexMergeError
from tests.conftest import TinyNet, write_zoo

METHODS = ["average", "task_arithmetic", "ties", "dare", "pcb", "consensus", "emr", "twin"]


@pytest.mark.parametrize("method", METHODS)
def test_at_Mx_every_export_equals_its_fine_tune_bit_for_bit(zoo, tasks, tmp_path, method):
    base, models = zoo
    flex = flexmerge.merge(tasks, size=float(tasks.num_tasks), method=method)
    flexmerge.save(flex, tmp_path / "flex")
    loaded = flexmerge.load(tmp_path / "flex")
    for name, path in models.items():
        out = flexmerge.export(loaded, name, tmp_path / f"{name}.safetensors")
        exported, original = load_file(out), load_file(path)
        assert exported.keys() == original.keys()
        for k in original:
            assert exported[k].dtype == original[k].dtype
            assert torch.equal(exported[k], original[k]), (name, k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_stay_exact_and_in_dtype(tmp_path, dtype):
    base, models = write_zoo(tmp_path / "zoo", num_tasks=3, dtype=dtype)
    tasks = flexmerge.load_tasks(base, models)
    flex = flexmerge.merge(tasks, size=3.0, method="ties")
    for name, path in models.items():
        ref = load_file(path)
        assert all(torch.equal(flex.state_dict(name)[k], ref[k]) for k in ref)
    merged = flexmerge.merge(tasks, size=1.0, method="ties").state_dict("task0")
    assert all(v.dtype == dtype for v in merged.values())


def _stored_bytes_on_disk(directory) -> int:
    total = 0
    for f in sorted(directory.glob("shard-*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            total += sum(h.get_tensor(k).nbytes for k in h.keys() if not k.startswith("frozen."))
    return total


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "emr", "consensus", "twin"])
@pytest.mark.parametrize("granularity", ["sublayer", "split:3"])
def test_reported_size_equals_bytes_stored(tasks, tmp_path, method, granularity):
    path = flexmerge.plan(tasks, method=method, granularity=granularity)
    for size in sorted({path.min_size, 2.3, 3.0, float(tasks.num_tasks)}):
        flex = flexmerge.materialize(tasks, path, size)
        out = tmp_path / f"{method}-{size}"
        flexmerge.save(flex, out)
        manifest = json.loads((out / "manifest.json").read_text())
        on_disk = _stored_bytes_on_disk(out)
        assert on_disk == manifest["stored_bytes"] == flex.stored_bytes()
        assert manifest["size"] == pytest.approx(on_disk / tasks.mergeable_bytes(), rel=1e-12)
        assert manifest["size"] <= size + 1e-9


def test_round_trip_is_exact_and_streaming_write_matches(tasks, tmp_path):
    flex = flexmerge.merge(tasks, size=2.5, method="emr", granularity="split:2")
    flexmerge.save(flex, tmp_path / "a")
    flexmerge.merge_to_disk(tasks, tmp_path / "b", size=2.5, method="emr", granularity="split:2")
    a, b = flexmerge.load(tmp_path / "a"), flexmerge.load(tmp_path / "b")
    for t in tasks.names:
        want = flex.state_dict(t)
        for other in (a, b):
            got = other.state_dict(t)
            assert all(torch.equal(want[k], got[k]) for k in want)
    assert a.groups_of("task0") == flex.groups_of("task0")


def test_corrupted_or_truncated_artifacts_fail_clearly(tasks, tmp_path):
    out = tmp_path / "flex"
    flexmerge.save(flexmerge.merge(tasks, size=2.0), out)
    shard = next(out.glob("shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        flexmerge.load(out)
    shard.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ArtifactError, match="truncated"):
        flexmerge.load(out)
    shard.unlink()
    with pytest.raises(ArtifactError, match="is missing"):
        flexmerge.load(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupted manifest"):
        flexmerge.load(out)
    (out / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        flexmerge.load(out)
    with pytest.raises(ArtifactError, match="not a flex-model directory"):
        flexmerge.load(tmp_path / "nowhere")


def _dying_after(mat, monkeypatch, blocks_done: int, calls: list):
    real = mat.materialize_block

    def dying(tasks, partition, b, *args, **kwargs):
        calls.append(b)
        if len(calls) == blocks_done + 1:
            raise KeyboardInterrupt("simulated crash")
        return real(tasks, partition, b, *args, **kwargs)

    monkeypatch.setattr(mat, "materialize_block", dying)
    return real


def test_a_crash_leaves_nothing_that_loads_and_the_rerun_resumes(tasks, tmp_path, monkeypatch):
    import flexmerge.flexmodel.materialize as mat

    out = tmp_path / "artifacts" / "out"
    calls: list[int] = []
    real = _dying_after(mat, monkeypatch, 5, calls)
    with pytest.raises(KeyboardInterrupt):
        flexmerge.merge_to_disk(tasks, out, size=2.0, method="ties", shard_bytes=1)  # a shard per block
    assert not out.exists()
    (partial,) = out.parent.iterdir()
    assert partial.name.startswith(".out.partial-")
    with pytest.raises(ArtifactError, match="no manifest.json"):
        flexmerge.load(partial)
    finished = calls[:5]
    monkeypatch.setattr(mat, "materialize_block", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    calls.clear()
    flexmerge.merge_to_disk(tasks, out, size=2.0, method="ties", shard_bytes=1)
    num_blocks = len(flexmerge.discover_blocks(tasks))
    assert sorted(calls + finished) == list(range(num_blocks))  # the 5 finished blocks were not merged again
    assert os.listdir(out.parent) == ["out"]
    resumed = flexmerge.load(out)
    fresh = flexmerge.merge(tasks, size=2.0, method="ties")
    for t in tasks.names:
        a, b = resumed.state_dict(t), fresh.state_dict(t)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_journal_names_a_shard_only_once_it_is_hashed_and_on_disk(tasks, tmp_path, monkeypatch):
    """Shards are sealed (sha256, fsync) on a thread while the next blocks merge; the resume
    journal and the manifest name a shard only after its seal, with the size and hash of the file."""
    import hashlib
    import threading

    from flexmerge.flexmodel import write
    from flexmerge.flexmodel.format import JOURNAL

    events: list[tuple[str, str]] = []
    real_seal, real_write = write.seal_file, write.write_text_atomic

    def seal(path):
        events.append(("sealed", path.name, threading.current_thread().name))
        return real_seal(path)

    def journal(path, text, *a, **k):
        if path.name == JOURNAL:
            for shard in json.loads(text)["shards"]:
                assert ("sealed", shard["file"]) in [e[:2] for e in events], shard["file"]
            events.append(("journal", str(len(json.loads(text)["shards"]))))
        return real_write(path, text, *a, **k)

    monkeypatch.setattr(write, "seal_file", seal)
    monkeypatch.setattr(write, "write_text_atomic", journal)
    manifest = flexmerge.merge_to_disk(tasks, tmp_path / "out", size=2.0, shard_bytes=1)
    sealed = [e for e in events if e[0] == "sealed"]
    assert len(sealed) == len(manifest["shards"]) > 2
    assert all(e[2].startswith("flexmerge-seal") for e in sealed)  # off the merging thread
    assert any(e[0] == "journal" for e in events)
    for shard in manifest["shards"]:
        data = (tmp_path / "out" / shard["file"]).read_bytes()
        assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
    flexmerge.load(tmp_path / "out", verify=True)


def test_a_shard_that_cannot_be_sealed_fails_the_write_and_leaves_nothing(tasks, tmp_path, monkeypatch):
    import threading

    from flexmerge.flexmodel import write

    def broken(path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(write, "seal_file", broken)
    with pytest.raises(OSError, match="No space left"):
        flexmerge.merge_to_disk(tasks, tmp_path / "arts" / "out", size=2.0, shard_bytes=1, resume=False)
    assert os.listdir(tmp_path / "arts") == []
    assert not any(t.name.startswith("flexmerge-seal") for t in threading.enumerate())


def test_without_resume_a_crash_leaves_no_directory_and_overwrite_is_explicit(tasks, tmp_path, monkeypatch):
    import flexmerge.flexmodel.materialize as mat

    out = tmp_path / "artifacts" / "out"
    real = _dying_after(mat, monkeypatch, 3, [])
    with pytest.raises(KeyboardInterrupt):
        flexmerge.merge_to_disk(tasks, out, size=2.0, resume=False)
    assert os.listdir(out.parent) == []
    monkeypatch.setattr(mat, "materialize_block", real)
    flexmerge.merge_to_disk(tasks, out, size=2.0)
    with pytest.raises(FlexMergeError, match="already exists"):
        flexmerge.merge_to_disk(tasks, out, size=2.0)
    flexmerge.merge_to_disk(tasks, out, size=1.0, overwrite=True)
    assert flexmerge.load(out).size == pytest.approx(1.0)
    assert os.listdir(out.parent) == ["out"]


def test_a_stale_partial_of_another_job_is_not_reused(tasks, tmp_path, monkeypatch):
    import flexmerge.flexmodel.materialize as mat

    out = tmp_path / "out"
    real = _dying_after(mat, monkeypatch, 4, [])
    with pytest.raises(KeyboardInterrupt):
        flexmerge.merge_to_disk(tasks, out, size=2.0, shard_bytes=1)
    monkeypatch.setattr(mat, "materialize_block", real)
    assert len(list(tmp_path.glob(".out.partial-*"))) == 1
    flexmerge.merge_to_disk(tasks, out, size=3.0, shard_bytes=1)  # another job: another partial
    assert flexmerge.load(out).size <= 3.0
    assert list(tmp_path.glob(".out.partial-*")) == []  # the stale one is cleaned up on success


def test_modules_share_the_stored_tensors(tasks):
    flex = flexmerge.merge(tasks, size=2.0)
    nets = {t: flex.module(t, TinyNet()) for t in tasks.names}
    for b, block in enumerate(flex.partition.blocks):
        for group in flex.assignment.groups[b]:
            ptrs = {nets[tasks.names[t]].get_parameter(block.parts[0].key).data_ptr() for t in group}
            assert len(ptrs) == 1, block.name
    assert nets["task0"].embed.weight.data_ptr() == nets["task3"].embed.weight.data_ptr()  # frozen: stored once


def test_export_hugging_face_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=100)
    torch.manual_seed(0)
    base = transformers.BertModel(cfg)
    base.save_pretrained(tmp_path / "base")
    models = {}
    for t in range(3):
        ft = transformers.BertModel(cfg)
        ft.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in ft.encoder.parameters():
                p.add_(0.01 * torch.randn_like(p))
        ft.save_pretrained(tmp_path / f"ft{t}")
        models[f"t{t}"] = tmp_path / f"ft{t}"
    tasks = flexmerge.load_tasks(tmp_path / "base", models)
    assert any(k.startswith("embeddings.") for k in tasks.frozen)
    flexmerge.merge_to_disk(tasks, tmp_path / "flex", size=1.5, method="ties")
    out = flexmerge.export(flexmerge.load(tmp_path / "flex"), "t1", tmp_path / "t1-export")
    assert (out / "config.json").is_file()
    reloaded = transformers.BertModel.from_pretrained(out)
    want = flexmerge.load(tmp_path / "flex").state_dict("t1")
    for k, v in reloaded.state_dict().items():
        if k in want:
            assert torch.equal(v, want[k]), k


def test_storage_dtype_is_configurable_and_accounted(tasks, tmp_path):
    """fp32 inputs stored in bf16: the unit is one fine-tune in bf16 (half the input bytes), so Mx
    is still M and 1x is one fully merged model, not half the blocks left unmerged."""
    path = flexmerge.plan(tasks, method="task_arithmetic", params={"dtype": "bfloat16"})
    half = tasks.mergeable_bytes() // 2
    assert path.sizes[0] == tasks.num_tasks and path.min_size == 1.0
    flex = flexmerge.materialize(tasks, path, 1.0)
    assert all(len(b.groups) == 1 for b in flex.blocks)  # fully merged
    flexmerge.save(flex, tmp_path / "bf16")
    assert all(v.dtype == torch.bfloat16 for k, v in flex.state_dict("task0").items() if k in tasks.mergeable)
    assert _stored_bytes_on_disk(tmp_path / "bf16") == flex.stored_bytes() == half == flex.unit_bytes
    assert json.loads((tmp_path / "bf16" / "manifest.json").read_text())["unit_bytes"] == half
    emr = flexmerge.merge(tasks, size=3.0, method="emr", params={"dtype": "float16"})
    assert emr.stored_bytes() == pytest.approx(emr.size * half)
    assert {v.dtype for k, v in emr.state_dict("task1").items() if k in tasks.mergeable} == {torch.float16}
