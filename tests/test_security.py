"""The security and failure model, one class at a time, on real files, through the API and the CLI:
paths from data stay inside their root; --out is never replaced behind the user's back; resume is
keyed on content; numbers are validated at the boundary; no raw tracebacks."""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import flexmerge
from flexmerge._atomic import ConcurrentWriteError, OutputExistsError, target_lock
from flexmerge.cli import app
from flexmerge.errors import ArtifactError, CheckpointError, ConfigError, FlexMergeError, SizeError
from flexmerge.io import open_checkpoint
from flexmerge.paths import UnsafePathError

from .conftest import tiny_state_dict

runner = CliRunner()


def _flags(models: dict[str, Path]) -> list[str]:
    return [x for name, p in models.items() for x in ("--model", f"{name}={p}")]


def _merge(zoo, out: Path, *extra: str):
    base, models = zoo
    return runner.invoke(app, ["merge", "--base", str(base), *_flags(models), "--size", "2", "--out", str(out), *extra])


def _one_line_error(r, exit_code: int = 2) -> str:
    assert r.exit_code == exit_code, r.output
    assert "Traceback" not in r.output
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    return lines[0]


# 1. Paths taken from data ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../../victim", "..", ".", "a/b", "/abs", "-flag", "with space", "é", ""])
def test_unsafe_task_names_are_refused_before_anything_is_written(zoo, tmp_path, name):
    base, models = zoo
    out = tmp_path / "deep" / "out"
    hostile = {name: models.pop("task0"), **models}
    r = runner.invoke(app, ["merge", "--base", str(base), *_flags(hostile), "--size", "2", "--out", str(out)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert ("not allowed" in r.output) or ("NAME=PATH" in r.output)
    assert not (tmp_path / "deep").exists() and not (tmp_path / "victim").exists()
    with pytest.raises(FlexMergeError):
        flexmerge.load_tasks(base, hostile)


def test_unsafe_task_names_in_yaml_are_refused(zoo, tmp_path):
    base, models = zoo
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(f"base: {base}\nmodels:\n  '../x': {models['task0']}\n  ok: {models['task1']}\nsize: 1\n")
    line = _one_line_error(runner.invoke(app, ["merge", "--config", str(cfg), "--out", str(tmp_path / "o")]))
    assert "'../x'" in line and "not allowed" in line


def _safetensors_index(directory: Path, weight_map: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


def test_an_index_cannot_name_a_shard_outside_the_model_directory(tmp_path):
    sd = tiny_state_dict()
    save_file(sd, str(tmp_path / "outside.safetensors"))
    for i, hostile in enumerate(["../outside.safetensors", str(tmp_path / "outside.safetensors"),
                                 "sub/../../outside.safetensors"]):
        model = _safetensors_index(tmp_path / f"m{i}", {k: hostile for k in sd})
        with pytest.raises(UnsafePathError, match="outside|absolute"):
            open_checkpoint(model)
    # a symlink inside the directory that leads out of it is refused too
    link_dir = tmp_path / "linked"
    link_dir.mkdir()
    (link_dir / "shard.safetensors").symlink_to(tmp_path / "outside.safetensors")
    _safetensors_index(link_dir, {k: "shard.safetensors" for k in sd})
    with pytest.raises(UnsafePathError, match="outside"):
        open_checkpoint(link_dir)


def test_a_torch_bin_index_cannot_pull_in_an_outside_file(tmp_path):
    torch.save({"SECRET": torch.ones(3)}, tmp_path / "secret.bin")
    model = tmp_path / "model"
    model.mkdir()
    torch.save(tiny_state_dict(), model / "pytorch_model-1.bin")
    weight_map = {k: "pytorch_model-1.bin" for k in tiny_state_dict()} | {"SECRET": "../secret.bin"}
    (model / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(UnsafePathError):
        open_checkpoint(model / "pytorch_model.bin.index.json")


def test_a_symlinked_index_may_name_shards_beside_its_target(tmp_path):
    """A Hugging Face cache snapshot: the index and shards are symlinks into one blobs/ folder."""
    sd = tiny_state_dict()
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    save_file(sd, str(blobs / "shard"))
    (blobs / "index").write_text(json.dumps({"weight_map": {k: "model-1.safetensors" for k in sd}}))
    (snap / "model.safetensors.index.json").symlink_to(blobs / "index")
    (snap / "model-1.safetensors").symlink_to(blobs / "shard")
    assert sorted(open_checkpoint(snap).keys()) == sorted(sd)


@pytest.fixture
def artifact(tasks, tmp_path) -> Path:
    out = tmp_path / "flex"
    flexmerge.save(flexmerge.merge(tasks, size=2.0), out)
    return out


def _edit_manifest(artifact: Path, edit) -> None:
    mf = artifact / "manifest.json"
    m = json.loads(mf.read_text())
    edit(m)
    mf.write_text(json.dumps(m))


@pytest.mark.parametrize("hostile", ["../secret.safetensors", "/etc/passwd", "shard-00000.safetensors/../../x"])
def test_a_manifest_cannot_name_a_shard_outside_the_artifact(artifact, tmp_path, hostile):
    shutil.copy(artifact / "shard-00000.safetensors", tmp_path / "secret.safetensors")  # valid, with a valid checksum

    def edit(m):
        m["shards"][0]["file"] = hostile
    _edit_manifest(artifact, edit)
    with pytest.raises(ArtifactError, match="malformed manifest"):
        flexmerge.load(artifact)
    line = _one_line_error(runner.invoke(app, ["export", str(artifact), "--task", "task0",
                                               "--out", str(tmp_path / "e.safetensors")]))
    assert "shard" in line
    assert not (tmp_path / "e.safetensors").exists()


def test_a_manifest_cannot_make_export_copy_outside_files(tasks, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                  vocab_size=50)
    dirs = {}
    for i, name in enumerate(["base", "a", "b"]):
        torch.manual_seed(i)
        m = transformers.BertModel(cfg)
        if i:
            base_sd = transformers.BertModel.from_pretrained(dirs["base"]).state_dict()
            m.load_state_dict({k: v + 0.01 * torch.randn_like(v) for k, v in base_sd.items()})
        m.save_pretrained(tmp_path / name)
        dirs[name] = tmp_path / name
    tasks = flexmerge.load_tasks(dirs["base"], {"a": dirs["a"], "b": dirs["b"]})
    art = tmp_path / "flex"
    flexmerge.save(flexmerge.merge(tasks, size=1.0), art)
    (tmp_path / "secret.txt").write_text("id_rsa")

    _edit_manifest(art, lambda m: m.update(hf_tasks=["../.."]))  # not a task
    with pytest.raises(ArtifactError, match="hf_tasks"):
        flexmerge.load(art)
    _edit_manifest(art, lambda m: m.update(hf_tasks=["a", "b"]))
    (art / "hf" / "a" / "config.json").unlink()
    (art / "hf" / "a" / "config.json").symlink_to(tmp_path / "secret.txt")  # a side file leading out
    with pytest.raises(UnsafePathError, match="outside"):
        flexmerge.load(art)


# 2. No data loss at --out --------------------------------------------------------------------------


def test_overwrite_replaces_only_an_artifact(zoo, tmp_path, artifact):
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("precious")
    line = _one_line_error(_merge(zoo, user_dir, "--overwrite"))
    assert "is not a flex-model artifact" in line
    assert (user_dir / "notes.txt").read_text() == "precious"
    assert _merge(zoo, artifact).exit_code == 2  # exists, no --overwrite
    r = _merge(zoo, artifact, "--overwrite", "--method", "ties")
    assert r.exit_code == 0, r.output
    assert flexmerge.load(artifact).method["name"] == "ties"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_directory_created_at_out_during_the_merge_is_left_alone(tasks, tmp_path, monkeypatch):
    import flexmerge.flexmodel.materialize as mat

    out = tmp_path / "out"
    real = mat.materialize_block

    def meanwhile(*a, **k):
        if not out.exists():
            out.mkdir()
            (out / "user.txt").write_text("mine")
        return real(*a, **k)
    monkeypatch.setattr(mat, "materialize_block", meanwhile)
    for overwrite in (False, True):  # even --overwrite: what appeared is not an artifact
        with pytest.raises(OutputExistsError):
            flexmerge.merge_to_disk(tasks, out, size=2.0, overwrite=overwrite)
        assert os.listdir(out) == ["user.txt"]


def test_a_second_writer_fails_naming_the_first(tasks, tmp_path):
    out = tmp_path / "outs" / "out"
    out.parent.mkdir()
    with target_lock(out):
        with pytest.raises(ConcurrentWriteError, match=f"pid {os.getpid()}"):
            flexmerge.merge_to_disk(tasks, out, size=2.0)
    assert not out.exists()
    flexmerge.merge_to_disk(tasks, out, size=2.0)  # the lock is gone with its holder
    assert os.listdir(out.parent) == ["out"]


def test_two_concurrent_merges_leave_one_complete_artifact(tasks, tmp_path):
    out, errors = tmp_path / "outs" / "out", []

    def run():
        try:
            flexmerge.merge_to_disk(tasks, out, size=2.0, shard_bytes=1)
        except FlexMergeError as e:
            errors.append(e)
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 1 and isinstance(errors[0], (ConcurrentWriteError, OutputExistsError))
    flexmerge.load(out)
    assert os.listdir(out.parent) == ["out"]
    names = {p.name for p in out.rglob("*")}
    assert "manifest.json" in names and not any(n.endswith((".tmp", ".partial", ".lock")) for n in names)


def test_plan_out_never_replaces_a_user_file(zoo, tmp_path):
    base, models = zoo
    target = tmp_path / "notes.json"
    target.write_text('{"mine": true}')
    argv = ["plan", "--base", str(base), *_flags(models), "--out", str(target)]
    assert "already exists" in _one_line_error(runner.invoke(app, argv))
    assert "not a flexmerge path file" in _one_line_error(runner.invoke(app, [*argv, "--overwrite"]))
    assert target.read_text() == '{"mine": true}'
    path_file = tmp_path / "path.json"
    assert runner.invoke(app, [*argv[:-1], str(path_file)]).exit_code == 0
    r = runner.invoke(app, [*argv[:-1], str(path_file), "--overwrite", "--method", "ties"])
    assert r.exit_code == 0, r.output
    assert json.loads(path_file.read_text())["method"]["name"] == "ties"


def test_export_overwrite_replaces_only_an_export(artifact, tmp_path):
    user = tmp_path / "weights.safetensors"
    save_file({"x": torch.ones(2)}, str(user))
    r = runner.invoke(app, ["export", str(artifact), "--task", "task0", "--out", str(user), "--overwrite"])
    assert "is not a flexmerge export" in _one_line_error(r)
    assert list(load_file(user)) == ["x"]
    out = tmp_path / "t0.safetensors"
    for _ in range(2):
        r = runner.invoke(app, ["export", str(artifact), "--task", "task0", "--out", str(out), "--overwrite"])
        assert r.exit_code == 0, r.output


# 3. Resume is keyed on content ---------------------------------------------------------------------


def test_a_changed_tensor_in_the_middle_of_an_input_is_not_resumed_over(zoo, tmp_path, monkeypatch):
    import flexmerge.flexmodel.materialize as mat

    base, models = zoo
    out = tmp_path / "out"
    real, done = mat.materialize_block, []

    def dying(*a, **k):
        if len(done) == 4:
            raise KeyboardInterrupt
        done.append(a[2])
        return real(*a, **k)
    monkeypatch.setattr(mat, "materialize_block", dying)
    with pytest.raises(KeyboardInterrupt):
        flexmerge.merge_to_disk(flexmerge.load_tasks(base, models), out, size=2.0, shard_bytes=1)
    monkeypatch.setattr(mat, "materialize_block", real)

    sd = load_file(models["task1"])  # same size, same header: only bytes in the middle change
    middle = list(sd)[len(sd) // 2]
    sd[middle] = sd[middle] + 0.5
    before = os.path.getsize(models["task1"])
    save_file(sd, str(models["task1"]))
    assert os.path.getsize(models["task1"]) == before

    tasks = flexmerge.load_tasks(base, models)
    flexmerge.merge_to_disk(tasks, out, size=2.0, shard_bytes=1)
    resumed, fresh = flexmerge.load(out), flexmerge.merge(tasks, size=2.0)
    for t in tasks.names:
        a, b = resumed.state_dict(t), fresh.state_dict(t)
        assert all(torch.equal(a[k], b[k]) for k in a), t
    assert resumed.info["inputs"]["task1"]["xxh3_128"] == tasks.provenance["task1"]["xxh3_128"]


@pytest.mark.parametrize("algo", ["xxh3_128", "sha256"])
def test_content_digest_covers_every_byte_and_only_content(zoo, tmp_path, algo):
    base, models = zoo
    digest = flexmerge.load_tasks(base, models, input_hash=algo).provenance
    sd = load_file(models["task2"])
    save_file(dict(reversed(list(sd.items()))), str(tmp_path / "reordered.safetensors"))  # same tensors, other layout
    moved = flexmerge.load_tasks(base, {**models, "task2": tmp_path / "reordered.safetensors"},
                                 input_hash=algo).provenance
    assert moved["task2"][algo] == digest["task2"][algo]
    key = list(sd)[-1]
    flat = sd[key].view(-1)
    flat[flat.numel() // 2] = torch.nextafter(flat[flat.numel() // 2], torch.tensor(10.0))  # one ulp
    save_file(sd, str(models["task2"]))
    changed = flexmerge.load_tasks(base, models, input_hash=algo).provenance
    assert changed["task2"][algo] != digest["task2"][algo]
    assert changed["task0"][algo] == digest["task0"][algo]


@pytest.mark.parametrize("algo", ["xxh3_128", "sha256"])
def test_content_digest_is_the_documented_hash_of_names_dtypes_shapes_and_bytes(zoo, algo):
    """docs/security.md: per model, H over 'key NUL dtype NUL shape NUL H(bytes)' lines in key order."""
    import hashlib

    import xxhash

    new = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}[algo]
    base, models = zoo
    got = flexmerge.load_tasks(base, models, input_hash=algo).provenance["base"]
    sd = load_file(base)
    h = new()
    for k in safe_open_keys(base):
        t = sd[k].contiguous()
        h.update(f"{k}\0{t.dtype}\0{list(t.shape)}\0{new(t.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()}\n"
                 .encode())
    assert got == {"files": got["files"], algo: h.hexdigest()}


def safe_open_keys(path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def test_unknown_input_hash_is_a_clear_error(zoo):
    base, models = zoo
    with pytest.raises(ConfigError, match="unknown input hash 'md5'.*xxh3_128, sha256"):
        flexmerge.load_tasks(base, models, input_hash="md5")


# 4. Numbers validated at the boundary --------------------------------------------------------------


@pytest.mark.parametrize("size, message", [("99", "above 4x"), ("inf", "finite"), ("nan", "finite"),
                                           ("0", "greater than 0"), ("0.5", "below the smallest size")])
def test_sizes_outside_1_to_M_are_errors(zoo, tmp_path, size, message):
    base, models = zoo
    r = runner.invoke(app, ["merge", "--base", str(base), *_flags(models), "--size", size, "--out", str(tmp_path / "o")])
    assert message in _one_line_error(r)
    assert not (tmp_path / "o").exists()


def test_size_above_M_is_an_error_in_the_api(tasks):
    path = flexmerge.plan(tasks)
    with pytest.raises(SizeError, match="above 4x"):
        path.cut(4.5)
    with pytest.raises(SizeError, match="finite"):
        path.cut(float("inf"))
    assert path.cut(4.0) == path.assignment(0)


@pytest.mark.parametrize("param", ["lam=NaN", "lam=Infinity", "lam=-Infinity", "keep=NaN"])
def test_non_finite_hyperparameters_are_refused(zoo, tmp_path, param):
    line = _one_line_error(_merge(zoo, tmp_path / "o", "--method", "ties", "--param", param))
    assert "finite" in line
    with pytest.raises(ConfigError):
        flexmerge.get_method("ties", **{param.split("=")[0]: float("nan")})


def test_a_manifest_never_holds_nan(tasks, tmp_path):
    flex = flexmerge.merge(tasks, size=2.0)
    flex.info["requested_size"] = float("nan")
    with pytest.raises(ArtifactError, match="NaN"):
        flexmerge.save(flex, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_a_task_named_twice_in_yaml_is_refused(zoo, tmp_path):
    base, models = zoo
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(f"base: {base}\nmodels:\n  a: {models['task0']}\n  b: {models['task1']}\n  a: {models['task2']}\n")
    line = _one_line_error(runner.invoke(app, ["merge", "--config", str(cfg), "--size", "1", "--out", str(tmp_path / "o")]))
    assert "'a' is given twice" in line


# 5. One error boundary, no raw tracebacks ----------------------------------------------------------


def _header_file(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return path


def _bad_inputs(tmp_path: Path) -> dict[str, Path]:
    bad = {
        "list header": _header_file(tmp_path / "list.safetensors", b"[1, 2]"),
        "negative shape": _header_file(tmp_path / "neg.safetensors",
                                       b'{"w": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]}}', bytes(16)),
        "float shape": _header_file(tmp_path / "flt.safetensors",
                                    b'{"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}', bytes(8)),
        "huge header": tmp_path / "huge.safetensors",
        "not a directory of weights": tmp_path / "empty_dir",
    }
    bad["huge header"].write_bytes((1 << 62).to_bytes(8, "little") + b"{}")
    bad["not a directory of weights"].mkdir()
    for name, content in (("latin1", b'{"weight_map": {"w": "caf\xe9"}}'), ("nonstring", b'{"weight_map": {"w": 3}}')):
        d = tmp_path / f"index-{name}"
        d.mkdir()
        (d / "model.safetensors.index.json").write_bytes(content)
        bad[f"index {name}"] = d
    return bad


def test_malformed_inputs_are_one_line_errors(zoo, tmp_path):
    base, models = zoo
    for what, path in _bad_inputs(tmp_path).items():
        r = runner.invoke(app, ["merge", "--base", str(base), *_flags({**models, "task0": path}), "--size", "2",
                                "--out", str(tmp_path / "o")])
        line = _one_line_error(r)
        assert str(path) in line, (what, line)


def test_compressed_torch_files_are_refused_before_inflating(tmp_path):
    plain = tmp_path / "plain.bin"
    torch.save({"w": torch.zeros(1 << 16)}, plain)
    packed = tmp_path / "packed.bin"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    with pytest.raises(CheckpointError, match="compressed"):
        open_checkpoint(packed)
    assert list(open_checkpoint(plain).keys()) == ["w"]


def test_bad_block_patterns_and_yaml_are_one_line_errors(zoo, tmp_path):
    base, models = zoo
    model_lines = "".join(f"  {k}: {v}\n" for k, v in models.items())
    cases = {
        "invalid regex": ("blocks:\n  'b{0}': 'layers\\.(\\d+\\..*'\n", "not a valid regular expression"),
        "placeholder": ("blocks:\n  'b{5}': 'layers\\.(\\d+)\\..*'\n", "placeholders"),
    }
    for what, (extra, message) in cases.items():
        cfg = tmp_path / f"{what}.yaml"
        cfg.write_text(f"base: {base}\nmodels:\n{model_lines}size: 2\n{extra}")
        line = _one_line_error(runner.invoke(app, ["merge", "--config", str(cfg), "--out", str(tmp_path / "o")]))
        assert message in line, (what, line)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"base: caf\xe9\n")
    assert "not UTF-8" in _one_line_error(runner.invoke(app, ["merge", "--config", str(latin), "--out", "o"]))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("blocks"), "'blocks'"),
    (lambda m: m["blocks"][0]["groups"].append([99]), "exactly once"),
    (lambda m: m["blocks"][0]["stored"][0].update(members=[-1]), "exactly once"),
    (lambda m: m.update(tasks="abc"), "'tasks'"),
    (lambda m: m["keys"][next(iter(m["keys"]))].update(shape=[-3]), "shape"),
    (lambda m: m.update(unit_bytes=-5), "field 'unit_bytes' is -5; sizes are above 0"),
    (lambda m: m.update(method={"name": 5}), "'method' has no name"),
])
def test_malformed_manifests_are_one_line_errors(artifact, edit, message):
    _edit_manifest(artifact, edit)
    with pytest.raises(ArtifactError, match="malformed manifest"):
        flexmerge.load(artifact)
    for argv in (["inspect", str(artifact)], ["export", str(artifact), "--task", "task0", "--out", "x.safetensors"]):
        assert message in _one_line_error(runner.invoke(app, argv))


def _widen_to(m: dict, n: int) -> None:
    """`n` tasks, every block one group of all of them (stored once), each task with its own (empty)
    set of parameters and side files: every per-task structure of the manifest n long."""
    m["tasks"] = [f"t{i}" for i in range(n)]
    for block in m["blocks"]:
        block["groups"] = [list(range(n))]
        block["stored"] = [{**block["stored"][0], "members": list(range(n))}]
    m["task_specific"] = {t: {} for t in m["tasks"]}
    m["hf_tasks"] = m["tasks"]
    m["side_files"] = {t: {} for t in m["tasks"]}


def test_a_manifest_of_too_many_tasks_is_refused_in_one_line(artifact):
    """10^5 tasks (a 50 MB manifest) are over the cap: refused at once, before any per-task check."""
    _edit_manifest(artifact, lambda m: _widen_to(m, 100_000))
    start = time.monotonic()
    line = _one_line_error(runner.invoke(app, ["inspect", str(artifact)]))
    assert time.monotonic() - start < 10
    assert "malformed manifest: 'tasks' lists 100000 tasks; at most 10000" in line


def test_a_manifest_of_a_million_tasks_is_refused_within_seconds(artifact):
    """10^6 tasks in one block (22 MB): parsed, then refused by the cap (it never finished: the
    checks were quadratic); with every block listing them all (200 MB), refused unread by size."""
    def million(m: dict) -> None:
        m["tasks"] = [f"t{i}" for i in range(1_000_000)]
        m["blocks"] = [{**m["blocks"][0], "groups": [list(range(1_000_000))]}]
    _edit_manifest(artifact, million)
    start = time.monotonic()
    line = _one_line_error(runner.invoke(app, ["inspect", str(artifact)]))
    assert time.monotonic() - start < 10
    assert "malformed manifest: 'tasks' lists 1000000 tasks; at most 10000" in line
    with open(artifact / "manifest.json", "ab") as f:
        f.truncate(65 << 20)  # what every block listing them all would weigh, and more
    assert "manifest.json: larger than 64 MiB; not a manifest" in _one_line_error(
        runner.invoke(app, ["inspect", str(artifact)]))


def test_a_manifest_of_many_tasks_is_checked_in_linear_time(artifact):
    """At the cap, 10^4 tasks in every per-task structure load in well under a second of checks (the
    membership tests were on lists: 5 s here, and 10^6 tasks never finished)."""
    _edit_manifest(artifact, lambda m: _widen_to(m, 10_000))
    start = time.monotonic()
    flex = flexmerge.load(artifact)
    assert time.monotonic() - start < 3
    assert len(flex.tasks) == 10_000 and flex.hf_files["t9999"] == {}


def test_os_errors_name_the_file(zoo, tmp_path, monkeypatch):
    """A full disk (or a read-only/denied output) is one line naming the file, and leaves no artifact."""
    import flexmerge.flexmodel.write as art

    def full(tensors, filename, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
    monkeypatch.setattr(art, "save_file", full)
    line = _one_line_error(_merge(zoo, tmp_path / "o", "--no-resume"))
    assert "No space left" in line and "shard-00000.safetensors" in line and "free some space" in line
    assert os.listdir(tmp_path) == ["zoo"]
    blocked = tmp_path / "file"
    blocked.write_text("")
    line = _one_line_error(_merge(zoo, blocked / "o"))  # the output's parent is a file
    assert str(blocked) in line


def test_unexpected_errors_say_internal_and_point_to_debug(zoo, tmp_path, monkeypatch):
    import flexmerge.api as api

    def broken(*a, **k):
        raise ZeroDivisionError("boom")
    monkeypatch.setattr(api, "merge_to_disk", broken)
    line = _one_line_error(_merge(zoo, tmp_path / "o"), exit_code=1)
    assert "internal error (ZeroDivisionError: boom)" in line and "--debug" in line
    base, models = zoo
    r = runner.invoke(app, ["--debug", "merge", "--base", str(base), *_flags(models), "--size", "2",
                            "--out", str(tmp_path / "o")])
    assert isinstance(r.exception, ZeroDivisionError)


# Found by probing as an attacker: regressions -------------------------------------------------------


def test_a_symlink_at_the_lock_name_is_not_written_through(tasks, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("IMPORTANT")
    outs = tmp_path / "outs"
    outs.mkdir()
    (outs / ".o.lock").symlink_to(victim)
    with pytest.raises(FlexMergeError, match="symlink"):
        flexmerge.merge_to_disk(tasks, outs / "o", size=2.0)
    assert victim.read_text() == "IMPORTANT" and not (outs / "o").exists()


def test_a_symlink_at_the_resume_directory_is_not_followed(tasks, tmp_path, monkeypatch):
    import flexmerge.flexmodel.materialize as mat

    outs, victim = tmp_path / "outs", tmp_path / "victimdir"
    outs.mkdir()
    victim.mkdir()
    (victim / "a.txt").write_text("precious")
    real, calls = mat.materialize_block, []

    def dying(*a, **k):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(mat, "materialize_block", dying)
    with pytest.raises(KeyboardInterrupt):
        flexmerge.merge_to_disk(tasks, outs / "o", size=2.0, shard_bytes=1)
    monkeypatch.setattr(mat, "materialize_block", real)
    (partial,) = outs.glob(".o.partial-*")
    shutil.rmtree(partial)
    partial.symlink_to(victim)  # the job key is predictable: an attacker can plant this
    with pytest.raises(FlexMergeError, match="symlink"):
        flexmerge.merge_to_disk(tasks, outs / "o", size=2.0, shard_bytes=1)
    assert os.listdir(victim) == ["a.txt"] and not (outs / "o").exists()


def test_stale_partial_cleanup_does_not_glob_the_output_name(tasks, tmp_path):
    outs = tmp_path / "outs"
    outs.mkdir()
    other = outs / ".xa.partial-deadbeef"  # another target's interrupted run
    other.mkdir()
    flexmerge.merge_to_disk(tasks, outs / "x[a]", size=2.0)
    assert other.is_dir()


def test_hf_side_files_linking_out_of_the_model_directory_are_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                  vocab_size=50)
    for i, name in enumerate(["base", "a", "b"]):
        torch.manual_seed(i)
        transformers.BertModel(cfg).save_pretrained(tmp_path / name)
    (tmp_path / "secret.txt").write_text("id_rsa")
    (tmp_path / "a" / "vocab.txt").symlink_to(tmp_path / "secret.txt")
    tasks = flexmerge.load_tasks(tmp_path / "base", {"a": tmp_path / "a", "b": tmp_path / "b"},
                                 max_relative_change=10)
    with pytest.raises(UnsafePathError, match="vocab.txt"):
        flexmerge.merge(tasks, size=1.0)


def test_huge_finite_hyperparameters_are_an_error_not_infinite_weights(tasks, tmp_path):
    with pytest.raises(ConfigError, match="NaN or infinite weights"):
        flexmerge.merge_to_disk(tasks, tmp_path / "o", size=1.0, params={"lam": 1e300})
    assert not (tmp_path / "o").exists()


def test_overwrite_keeps_a_directory_that_holds_user_files(artifact, zoo, tmp_path):
    (artifact / "notes.txt").write_text("mine")
    assert "is not a flex-model artifact" in _one_line_error(_merge(zoo, artifact, "--overwrite"))
    assert (artifact / "notes.txt").read_text() == "mine"


def test_a_full_disk_in_safetensors_is_a_user_error_naming_the_file(zoo, tmp_path, monkeypatch):
    import flexmerge.flexmodel.write as art
    from safetensors import SafetensorError

    def full(tensors, filename, *a, **k):
        raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")
    monkeypatch.setattr(art, "save_file", full)
    line = _one_line_error(_merge(zoo, tmp_path / "o", "--no-resume"))
    assert "shard-00000.safetensors" in line and "No space left" in line and "internal" not in line


def test_safetensors_headers_the_reference_refuses_are_refused(tmp_path):
    cases = {
        "overlap": b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},'
                   b' "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}',
        "metadata list": b'{"__metadata__": [1], "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
        "duplicate key": b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
                         b' "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}',
    }
    for what, header in cases.items():
        f = _header_file(tmp_path / f"{what.replace(' ', '_')}.safetensors", header, bytes(12))
        with pytest.raises(CheckpointError):
            open_checkpoint(f)


# Side files are part of the artifact's integrity -----------------------------------------------------


@pytest.fixture
def hf_artifact(hf_zoo, tmp_path):
    """A 2x merge of two BERT fine-tunes (2 and 3 labels), each saved with its word tokenizer."""
    from .conftest import word_tokenizer

    base, dirs = hf_zoo
    for name in ("a", "b"):
        word_tokenizer(["cat", "dog", "sat"]).save_pretrained(dirs[name])
    art = tmp_path / "flex"
    r = runner.invoke(app, ["merge", "--base", str(base), "--model", f"a={dirs['a']}", "--model", f"b={dirs['b']}",
                            "--size", "2", "--out", str(art)])
    assert r.exit_code == 0, r.output
    return art


def _swap_labels(f: Path) -> None:
    config = json.loads(f.read_text())
    config["id2label"] = {"0": config["id2label"]["1"], "1": config["id2label"]["0"]}
    f.write_text(json.dumps(config))


def _swap_token_ids(f: Path) -> None:
    tokenizer = json.loads(f.read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["cat"], vocab["dog"] = vocab["dog"], vocab["cat"]
    f.write_text(json.dumps(tokenizer))


@pytest.mark.parametrize("name, tamper, problem", [
    ("config.json", _swap_labels, "checksum mismatch: the file was changed after the artifact was written"),
    ("tokenizer.json", _swap_token_ids, "checksum mismatch: the file was changed after the artifact was written"),
    ("vocab.txt", lambda f: f.write_text("[PAD]\n"), "a side file the manifest does not list"),
    ("tokenizer_config.json", Path.unlink, "missing; the manifest lists it"),
])
def test_changed_side_files_are_refused_naming_the_file(hf_artifact, tmp_path, name, tamper, problem):
    """The manifest records each side file's size and sha256 like a shard's: a config with swapped
    label names, a tokenizer with swapped ids, a file added or removed is one error naming it."""
    manifest = json.loads((hf_artifact / "manifest.json").read_text())
    assert set(manifest["side_files"]) == {"a", "b"} and "tokenizer.json" in manifest["side_files"]["a"]
    tamper(hf_artifact / "hf" / "a" / name)
    line = _one_line_error(runner.invoke(app, ["export", str(hf_artifact), "--task", "a", "--out",
                                               str(tmp_path / "out")]))
    assert f"{hf_artifact / 'hf' / 'a' / name}: {problem}" in " ".join(line.split())
    assert not (tmp_path / "out").exists()


def test_an_artifact_from_before_side_file_checksums_loads_with_a_note(hf_artifact, tmp_path):
    _edit_manifest(hf_artifact, lambda m: m.pop("side_files"))
    r = runner.invoke(app, ["export", str(hf_artifact), "--task", "b", "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "note: " in r.output and "side files are not verified; merge again to record their checksums" in " ".join(
        r.output.split())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["id2label"] == {"0": "L0", "1": "L1", "2": "L2"}


def test_side_file_entries_are_checked_with_the_manifest(hf_artifact):
    _edit_manifest(hf_artifact, lambda m: m["side_files"]["a"].update({"../../etc/passwd": {"bytes": 1,
                                                                                           "sha256": "0" * 64}}))
    with pytest.raises(ArtifactError, match="malformed manifest: side file '../../etc/passwd' of task 'a'"):
        flexmerge.load(hf_artifact)
