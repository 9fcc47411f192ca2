"""Checkpoint formats in, and a clear error (naming file and key) for every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import flexmerge
from flexmerge.errors import CheckpointError, ConfigError
from flexmerge.io.source import read_rows_into
from tests.conftest import fine_tune, tiny_state_dict


def _write_pair(tmp_path: Path, mutate=None, base_sd=None):
    base = base_sd or tiny_state_dict()
    save_file(base, str(tmp_path / "base.safetensors"))
    a, b = fine_tune(base, 0), fine_tune(base, 1)
    if mutate:
        mutate(b)
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    return tmp_path / "base.safetensors", {"a": tmp_path / "a.safetensors", "b": tmp_path / "b.safetensors"}


def test_all_formats_read_the_same_tensors(tmp_path):
    base = tiny_state_dict()
    ft = fine_tune(base, 0)
    save_file(ft, str(tmp_path / "ft.safetensors"))
    torch.save(ft, tmp_path / "ft.pt")
    keys = list(ft)
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    half = len(keys) // 2
    save_file({k: ft[k] for k in keys[:half]}, str(shard_dir / "model-00001.safetensors"))
    save_file({k: ft[k] for k in keys[half:]}, str(shard_dir / "model-00002.safetensors"))
    index = {"weight_map": {k: ("model-00001.safetensors" if i < half else "model-00002.safetensors")
                            for i, k in enumerate(keys)}}
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    save_file(ft, str(hf_dir / "model.safetensors"))
    (hf_dir / "config.json").write_text("{}")
    from flexmerge.io import open_checkpoint

    for path in [tmp_path / "ft.safetensors", tmp_path / "ft.pt", shard_dir / "model.safetensors.index.json",
                 shard_dir, hf_dir]:
        src = open_checkpoint(path)
        assert sorted(src.keys()) == sorted(keys), path
        for k in keys:
            assert torch.equal(src.read(k), ft[k]), (path, k)
            for rows in [None, (1, 3)]:  # streaming passes read into reused buffers
                expected = ft[k] if rows is None else ft[k][rows[0]:rows[1]]
                buf = torch.full_like(expected, float("nan"))
                read_rows_into(src, k, rows, buf)
                assert torch.equal(buf, expected), (path, k, rows)
    assert open_checkpoint(hf_dir).hf_dir == hf_dir
    with pytest.raises(ValueError, match="cannot hold"):
        read_rows_into(open_checkpoint(tmp_path / "ft.safetensors"), keys[1], None, torch.empty(3, dtype=torch.float16))


def test_load_tasks_finds_frozen_parameters(zoo):
    base, models = zoo
    tasks = flexmerge.load_tasks(base, models)
    assert tasks.frozen == ["embed.weight"]
    assert "embed.weight" not in tasks.mergeable
    assert tasks.frozen_bytes() == 20 * 16 * 4
    assert tasks.mergeable_bytes() == sum(tasks.meta[k].numel * 4 for k in tasks.mergeable)


@pytest.mark.parametrize("mutate, match", [
    (lambda sd: sd.pop("layers.0.norm1.weight"), r"b\.safetensors.*missing: \['layers\.0\.norm1\.weight'\]"),
    (lambda sd: sd.__setitem__("extra.weight", torch.full((2,), float("nan"))), r"b\.safetensors.*'extra\.weight'.*NaN"),
    (lambda sd: sd.__setitem__("final_norm.weight", sd["final_norm.weight"].half()), r"b\.safetensors.*'final_norm\.weight'.*dtype"),
    (lambda sd: sd["layers.2.attn.qkv.bias"].__setitem__(3, float("nan")), r"b\.safetensors.*'layers\.2\.attn\.qkv\.bias'.*NaN or Inf"),
    (lambda sd: sd["layers.2.attn.qkv.bias"].__setitem__(0, float("inf")), r"b\.safetensors.*'layers\.2\.attn\.qkv\.bias'.*NaN or Inf"),
])
def test_bad_inputs_name_file_and_key(tmp_path, mutate, match):
    base, models = _write_pair(tmp_path, mutate)
    with pytest.raises(CheckpointError, match=match):
        flexmerge.load_tasks(base, models)


def test_mixed_dtypes_allowed_on_request(tmp_path):
    base, models = _write_pair(tmp_path, lambda sd: sd.__setitem__("final_norm.weight", sd["final_norm.weight"].half()))
    tasks = flexmerge.load_tasks(base, models, allow_mixed_dtypes=True)
    assert tasks.deltas(next(tasks.chunks("final_norm.weight"))).dtype == torch.float32


def test_fine_tune_identical_to_base_is_an_error(tmp_path):
    base_sd = tiny_state_dict()
    save_file(base_sd, str(tmp_path / "base.safetensors"))
    save_file(fine_tune(base_sd, 0), str(tmp_path / "a.safetensors"))
    save_file(base_sd, str(tmp_path / "same.safetensors"))
    with pytest.raises(CheckpointError, match=r"task 'same'.*same\.safetensors.*identical to the base"):
        flexmerge.load_tasks(tmp_path / "base.safetensors", {"a": tmp_path / "a.safetensors",
                                                             "same": tmp_path / "same.safetensors"})


def test_wrong_base_is_detected(tmp_path):
    base, models = _write_pair(tmp_path)
    save_file(tiny_state_dict(seed=99), str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match=r"does not look like the model it was fine-tuned from"):
        flexmerge.load_tasks(tmp_path / "other.safetensors", models)


def test_task_list_errors(tmp_path):
    base, models = _write_pair(tmp_path)
    with pytest.raises(ConfigError, match="at least 2 task models, got 1"):
        flexmerge.load_tasks(base, {"a": models["a"]})
    with pytest.raises(ConfigError, match=r"duplicate task name 'a'"):
        flexmerge.load_tasks(base, [f"a={models['a']}", f"a={models['b']}"])
    with pytest.raises(ConfigError, match=r"must be NAME=PATH"):
        flexmerge.load_tasks(base, [str(models["a"]), f"b={models['b']}"])
    with pytest.raises(CheckpointError, match=r"checkpoint not found: .*nope\.safetensors"):
        flexmerge.load_tasks(base, {"a": models["a"], "b": tmp_path / "nope.safetensors"})


def test_unreadable_and_pickled_inputs(tmp_path):
    base, models = _write_pair(tmp_path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match=r"junk\.safetensors: not a readable safetensors file"):
        flexmerge.load_tasks(base, {"a": models["a"], "b": tmp_path / "junk.safetensors"})
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match=r"module\.pt: cannot load as a weights-only"):
        flexmerge.load_tasks(base, {"a": models["a"], "b": tmp_path / "module.pt"})
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        flexmerge.load_tasks(base, {"a": models["a"], "b": tmp_path / "weights.txt"})
