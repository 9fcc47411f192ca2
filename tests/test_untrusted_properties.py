"""Property-based tests of the three parsers of untrusted input.

The contract (from the issue): *arbitrary bytes and arbitrary JSON never escape as an unhandled
exception and never touch a path outside the given root.*  Concretely, for

1. the safetensors header parser (`parse_safetensors_header`, `_open_safetensors`, `open_checkpoint`),
2. the shard index reader (`model.safetensors.index.json`, `pytorch_model.bin.index.json`),
3. the artifact manifest loader (`read_manifest`, `flexmerge.load`),

every input either loads or raises a `FlexMergeError`; anything else escaping is a bug.  Where an
input names files, every file that gets opened (`os.open`, `builtins.open`/`io.open`, and the
`safe_open` the artifact loader uses) must resolve inside the root the caller gave, even though a
valid file the input could point at is waiting right outside it.

The `test_regression_*` tests at the end pin inputs that once broke the contract (the same inputs
are pinned with `@example` in the properties).
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import flexmerge
from flexmerge.errors import FlexMergeError
from flexmerge.flexmodel import read as read_module
from flexmerge.flexmodel.read import read_manifest
from flexmerge.io import open_checkpoint
from flexmerge.io.source import SAFETENSORS_DTYPES, _open_safetensors, parse_safetensors_header

# No example database (failing examples are not stored between runs; the pinned ones below are
# what reproduces the known regressions), no deadline (file system timings vary).
FAST = dict(deadline=None, database=None)


# Shared strategies and helpers --------------------------------------------------------------------

# Integers are bounded so that `json.dumps` of a generated value always works (Python refuses to
# print ints of more than 4300 digits); huge-digit numbers are pinned explicitly below.
json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
                | st.text(max_size=12))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()  # NaN/Infinity included on purpose: they are not JSON


def frame(header: bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file: u64 little-endian header length (the true one unless given), header, data."""
    n = len(header) if length is None else length
    out = n.to_bytes(8, "little") + header + data
    return Pinned(out, f"frame({header!r}, {data!r})") if isinstance(header, Pinned) else out


class Pinned(bytes):
    """Bytes that print as a short label: pinned inputs of 100 kB stay readable in failure reports."""

    def __new__(cls, data: bytes, label: str):
        obj = super().__new__(cls, data)
        obj.label = label
        return obj

    def __repr__(self) -> str:
        return self.label


@contextlib.contextmanager
def recording_opens(with_safe_open: bool = False):
    """Record the path of every `os.open`, `builtins.open` and `io.open` call (and the artifact
    loader's `safe_open`, which is Rust and bypasses the others) made inside the block."""
    opened: list[str] = []
    real_os_open, real_open, real_safe_open = os.open, builtins.open, read_module.safe_open

    def note(path: Any) -> None:
        if not isinstance(path, int):  # an already open descriptor names no path
            opened.append(os.fsdecode(os.fspath(path)))

    def os_open(path, *args, **kwargs):
        note(path)
        return real_os_open(path, *args, **kwargs)

    def any_open(file, *args, **kwargs):
        note(file)
        return real_open(file, *args, **kwargs)

    def safe_open(path, *args, **kwargs):
        note(path)
        return real_safe_open(path, *args, **kwargs)

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch("os.open", os_open))
        stack.enter_context(mock.patch("builtins.open", any_open))
        stack.enter_context(mock.patch("io.open", any_open))  # pathlib's read_bytes/open go through io.open
        if with_safe_open:
            stack.enter_context(mock.patch.object(read_module, "safe_open", safe_open))
        yield opened


def assert_opened_only_inside(opened: list[str], root: Path) -> None:
    root = root.resolve()
    outside = []
    for p in opened:
        if "\0" in p:
            outside.append(p)  # an open was attempted on a path no check could have vetted
            continue
        real = Path(p).resolve()
        if real != root and root not in real.parents:
            outside.append(p)
    assert not outside, f"opened outside {root}: {outside}"


def call(fn, *args):
    """fn(*args), or None if it raised a FlexMergeError; any other exception propagates (a bug).
    The outcome is logged as a Hypothesis event (see `pytest --hypothesis-show-statistics`)."""
    try:
        out = fn(*args)
    except FlexMergeError as e:
        event(f"{fn.__name__}: refused ({type(e).__name__})")
        return None
    event(f"{fn.__name__}: accepted")
    return out


def close(src: Any) -> None:
    if hasattr(src, "close"):
        src.close()


# 1. The safetensors header -----------------------------------------------------------------------

DTYPE_NAMES = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "X"]
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1, "BOOL": 1}
HUGE_DIMS = [2**31, 2**62, 2**63 - 1, 2**63, 2**64]  # a tensor with a 0 dim may still have these


@st.composite
def nearly_valid_files(draw) -> bytes:
    """A valid safetensors file (tensors of the known dtypes laid out back to back, sometimes empty
    tensors with dims beyond int64, optional __metadata__, header padded with spaces, trailing
    bytes), then 0-2 defects: a wrong or non-string dtype (one of "X", None, 4, ["F32"], ...), a
    shape with negative dims or not a list, data_offsets of the wrong length/order/size or not a
    list, a missing field, an entry that is not an object, a truncated data section, or a wrong
    header length. A third of the files have no defect and must open."""
    header: dict[str, Any] = {}
    offset = 0
    for name in draw(st.lists(st.text(max_size=6).filter(lambda n: n != "__metadata__"), max_size=4, unique=True)):
        dtype = draw(st.sampled_from(list(ITEMSIZE)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        if draw(st.integers(0, 9)) == 0:
            shape += [0, draw(st.sampled_from(HUGE_DIMS))]  # no elements, whatever the other dims
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2))
    size, length = offset + draw(st.integers(0, 8)), None
    names = [n for n in header if n != "__metadata__"]
    for _ in range(draw(st.integers(0, 2))):
        defect = draw(st.sampled_from(["dtype", "shape", "offsets", "drop", "entry", "truncate", "length"]))
        if defect == "truncate":
            size = max(0, size - draw(st.integers(1, 8)))
        elif defect == "length":
            length = draw(st.integers(0, 2**64 - 1))
        elif names:
            name = draw(st.sampled_from(names))
            entry = header[name] if isinstance(header[name], dict) else {}
            if defect == "dtype":
                entry["dtype"] = draw(st.sampled_from(DTYPE_NAMES + ["f32", None, 4, ["F32"], {"F32": 1}]))
            elif defect == "shape":
                entry["shape"] = draw(st.lists(st.integers(-2, 5), max_size=3) | json_values)
            elif defect == "offsets":
                entry["data_offsets"] = draw(st.lists(st.integers(-4, offset + 8), max_size=3) | json_values)
            elif defect == "drop":
                entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
            else:
                header[name] = draw(json_values)
    raw = dumps(header) + b" " * draw(st.integers(0, 8))  # writers pad the header with spaces
    return frame(raw, draw(st.binary(min_size=size, max_size=size)), length)


arbitrary_json_files = st.builds(lambda v, data: frame(dumps(v), data), json_values, st.binary(max_size=64))
arbitrary_byte_files = st.binary(max_size=512) | st.builds(
    lambda n, rest: frame(b"", rest, n), st.integers(0, 600) | st.integers(0, 2**64 - 1), st.binary(max_size=512))

UNHASHABLE_DTYPE = {"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}
EMPTY_BUT_HUGE = [{"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}
                  for shape in ([2**63, 0], [0, 2**64], [2**62, 2**62, 0])]  # 0 elements; dims beyond int64
DEEP_HEADER = Pinned(b"[" * 100_000, "b'[' * 100_000")
DEEP_OBJECT = Pinned(b'{"a":' * 5000 + b"1" + b"}" * 5000, """b'{"a":' * 5000 + b'1' + b'}' * 5000""")
HUGE_INT = Pinned(b"1" * 5000, "b'1' * 5000")


def check_entries(entries: dict, data_start: int, file_size: int) -> None:
    for key, (dtype, shape, begin, end) in entries.items():
        assert key != "__metadata__"
        assert dtype in SAFETENSORS_DTYPES.values()
        assert all(type(d) is int and d >= 0 for d in shape)
        assert data_start <= begin <= end <= file_size, (key, begin, end, file_size)
        assert end - begin == math.prod(shape) * dtype.itemsize, (key, shape, dtype, begin, end)


@settings(max_examples=300, **FAST)
@given(raw=st.binary(max_size=256) | json_values.map(dumps) | nearly_valid_files().map(lambda b: b[8:]),
       data_start=st.integers(0, 64), file_size=st.integers(0, 256))
@example(raw=dumps(UNHASHABLE_DTYPE), data_start=8, file_size=100)  # once: TypeError
@example(raw=DEEP_HEADER, data_start=8, file_size=2**20)  # once: RecursionError
def test_parse_header_raises_only_value_error_and_returns_sound_entries(raw, data_start, file_size):
    """`parse_safetensors_header` either raises ValueError (what `_open_safetensors` turns into a
    CheckpointError) or returns entries that lie inside [data_start, file_size] and span exactly
    numel * itemsize bytes, so that no later pread can go astray."""
    try:
        entries = parse_safetensors_header(raw, data_start=data_start, file_size=file_size)
    except ValueError:
        return
    check_entries(entries, data_start, file_size)


@settings(max_examples=150, **FAST)
@given(blob=arbitrary_byte_files)
@example(blob=frame(DEEP_HEADER))  # once: RecursionError
def test_arbitrary_bytes_as_safetensors_file(blob):
    """A file x.safetensors of arbitrary bytes: `open_checkpoint` opens it or raises FlexMergeError."""
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "x.safetensors"
        f.write_bytes(blob)
        close(call(open_checkpoint, f))


@settings(max_examples=250, **FAST)
@given(blob=nearly_valid_files() | arbitrary_json_files)
@example(blob=frame(dumps(UNHASHABLE_DTYPE), b"\0" * 4))  # once: TypeError
@example(blob=frame(dumps(EMPTY_BUT_HUGE[0])))  # once: TypeError out of src.read (torch.empty overflow)
@example(blob=frame(dumps(EMPTY_BUT_HUGE[2])))  # once: RuntimeError out of src.read (storage size overflow)
def test_json_header_opens_soundly_or_raises_checkpoint_error(blob):
    """8-byte length + arbitrary or nearly valid JSON + data: opening raises FlexMergeError, or
    every entry satisfies data_start <= begin <= end <= file size with end - begin equal to
    numel * itemsize, and every tensor reads back with its declared shape, dtype and bytes."""
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "x.safetensors"
        f.write_bytes(blob)
        try:
            fd, entries = _open_safetensors(f)
        except FlexMergeError:
            event("refused")
            assert call(open_checkpoint, f) is None  # both entry points refuse it
            return
        os.close(fd)
        event(f"opened with {min(len(entries), 2)}{'+' if len(entries) > 1 else ''} tensors")
        check_entries(entries, data_start=8 + int.from_bytes(blob[:8], "little"), file_size=len(blob))
        src = open_checkpoint(f)
        try:
            assert set(src.keys()) == set(entries)
            for key, (dtype, shape, begin, end) in entries.items():
                assert src.meta(key).shape == shape and src.meta(key).dtype == dtype
                t = src.read(key)
                assert tuple(t.shape) == shape and t.dtype == dtype
                assert t.reshape(-1).view(torch.uint8).numpy().tobytes() == blob[begin:end]
        finally:
            close(src)


# 2. The shard index -----------------------------------------------------------------------------

SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
OUTSIDE_ABS = "<absolute path of root/outside.safetensors>"  # replaced in the test body
INSIDE_NAMES = [SHARD1, SHARD2, f"./{SHARD1}", f"sub/../{SHARD2}"]
LONG_NAME = "a" * 300  # one path component longer than NAME_MAX
HOSTILE_NAMES = [
    "../outside.safetensors", OUTSIDE_ABS, "sub/../../outside.safetensors",
    "evil.safetensors",  # a symlink in the model directory to ../outside.safetensors
    "evil_dir/outside.safetensors",  # a symlinked directory (evil_dir -> ..)
    "", f"{SHARD1}\0", "a\0/../../outside.safetensors", "~/outside.safetensors", "/etc/passwd",
    ".", "..", "sub", "missing.safetensors", "model.safetensors.index.json", LONG_NAME,
]
shard_names = (st.sampled_from(INSIDE_NAMES) | st.sampled_from(HOSTILE_NAMES) | st.text(max_size=12)
               | st.integers(-3, 3) | st.lists(st.text(max_size=3), max_size=2) | st.none() | st.booleans())
tensor_names = st.sampled_from(["a", "b", "c", "SECRET"]) | st.text(max_size=4)


@st.composite
def honest_maps_with_changes(draw) -> dict[str, Any]:
    """The true weight map ({a, b} in shard 1, c in shard 2), maybe less some keys, with 0-2 values
    replaced by names from `shard_names`."""
    wm: dict[str, Any] = {"a": SHARD1, "b": SHARD1, "c": SHARD2}
    for key in draw(st.sets(st.sampled_from(sorted(wm)), max_size=2)):
        del wm[key]
    for key in draw(st.lists(st.sampled_from(["a", "b", "c", "SECRET"]), max_size=2)):
        wm[key] = draw(shard_names)
    return wm


index_documents = st.one_of(
    st.binary(max_size=128),
    json_values.map(dumps),
    st.builds(lambda wm: dumps({"weight_map": wm}), json_values),
    st.builds(lambda wm, meta: dumps({"metadata": meta, "weight_map": wm}),
              st.dictionaries(tensor_names, shard_names, max_size=5), json_values),
    honest_maps_with_changes().map(lambda wm: dumps({"metadata": {"total_size": 72}, "weight_map": wm})),
    honest_maps_with_changes().map(lambda wm: dumps({"weight_map": wm})),
)


def replace_sentinel(value: Any, sentinel: str, by: str) -> Any:
    if value == sentinel:
        return by
    if isinstance(value, list):
        return [replace_sentinel(v, sentinel, by) for v in value]
    if isinstance(value, dict):
        return {k: replace_sentinel(v, sentinel, by) for k, v in value.items()}
    return value


def write_safetensors_model_dir(root: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    t = {k: torch.randn(2, 3, generator=g) for k in ("a", "b", "c", "SECRET")}
    save_file(t, str(root / "outside.safetensors"))  # what an escaping shard name would reach
    model = root / "model"
    (model / "sub").mkdir(parents=True)
    save_file({"a": t["a"], "b": t["b"]}, str(model / SHARD1))
    save_file({"c": t["c"]}, str(model / SHARD2))
    (model / "evil.safetensors").symlink_to("../outside.safetensors")
    (model / "evil_dir").symlink_to("..")
    return model


@settings(max_examples=150, **FAST)
@given(doc=index_documents)
@example(doc=dumps({"weight_map": {"a": LONG_NAME}}))  # once: OSError (File name too long)
@example(doc=HUGE_INT)  # once: ValueError (int of more than 4300 digits)
@example(doc=DEEP_HEADER)  # once: RecursionError
def test_safetensors_index_never_escapes_the_model_directory(doc):
    """`model.safetensors.index.json` of arbitrary bytes/JSON, or a weight map whose shard names
    mix real shards, `..`, absolute paths, symlinks out, NUL bytes, long names and non-strings:
    `open_checkpoint(root/"model")` succeeds or raises FlexMergeError, opens no file outside
    root/model (a valid root/outside.safetensors is there for the taking), and a successful open
    serves exactly the index's keys, never the outside file's SECRET, each readable."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        model = write_safetensors_model_dir(root)
        if doc.startswith(b"{"):
            with contextlib.suppress(ValueError):
                doc = dumps(replace_sentinel(json.loads(doc), OUTSIDE_ABS, str(root / "outside.safetensors")))
        (model / "model.safetensors.index.json").write_bytes(doc)
        with recording_opens() as opened:
            src = call(open_checkpoint, model)
            try:
                if src is not None:
                    keys = src.keys()
                    assert "SECRET" not in keys
                    assert set(keys) == set(json.loads(doc)["weight_map"])
                    for k in keys:
                        assert tuple(src.read(k).shape) == src.meta(k).shape == (2, 3)
            finally:
                close(src)
        assert_opened_only_inside(opened, model)


BIN1 = "pytorch_model-00001-of-00001.bin"
OUTSIDE_BIN_ABS = "<absolute path of root/outside.bin>"
bin_shard_names = (st.sampled_from([BIN1, f"./{BIN1}", f"sub/../{BIN1}"])
                   | st.sampled_from(["../outside.bin", OUTSIDE_BIN_ABS, "sub/../../outside.bin", "evil.bin",
                                      "evil_dir/outside.bin", "", f"{BIN1}\0", "..", "/etc/passwd", LONG_NAME])
                   | st.integers(-3, 3) | st.none() | st.lists(st.integers(), max_size=2))


@settings(max_examples=40, **FAST)
@given(wm=st.dictionaries(st.sampled_from(["a", "SECRET", "x"]), bin_shard_names, max_size=3)
       | st.builds(lambda v: {"a": v}, bin_shard_names) | json_values)
@example(wm={"a": LONG_NAME})  # once: OSError (File name too long)
def test_torch_bin_index_never_loads_an_outside_shard(wm):
    """`pytorch_model.bin.index.json` naming torch shards inside and outside the model directory
    (root/outside.bin holds a tensor named SECRET): the open succeeds or raises FlexMergeError,
    `os.open`/`open` see only paths inside root/model, and SECRET never shows up in `src.keys()`
    (torch.load's own C++ reader is not recorded; the key check covers it)."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        model = root / "model"
        (model / "sub").mkdir(parents=True)
        torch.save({"a": torch.ones(2)}, model / BIN1)
        torch.save({"SECRET": torch.zeros(2)}, root / "outside.bin")
        (model / "evil.bin").symlink_to("../outside.bin")
        (model / "evil_dir").symlink_to("..")
        wm = replace_sentinel(wm, OUTSIDE_BIN_ABS, str(root / "outside.bin"))
        (model / "pytorch_model.bin.index.json").write_bytes(dumps({"weight_map": wm}))
        with recording_opens() as opened:
            src = call(open_checkpoint, model)
        if src is not None:
            assert "SECRET" not in src.keys()
            assert src.keys() == ["a"]
        assert_opened_only_inside(opened, model)


# 3. The artifact manifest -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def artifact_template(tmp_path_factory) -> Path:
    """One small valid artifact (3 tasks, 2 mergeable blocks, 1 frozen key), built once per module."""
    d = tmp_path_factory.mktemp("artifact_template")
    g = torch.Generator().manual_seed(0)
    base = {"embed.weight": torch.randn(4, 4, generator=g),
            "layers.0.w": torch.randn(4, 4, generator=g), "layers.1.w": torch.randn(4, 4, generator=g)}
    save_file(base, str(d / "base.safetensors"))
    models = {}
    for name in ("a", "b", "c"):
        ft = {k: v if k == "embed.weight" else v + 0.1 * torch.randn(4, 4, generator=g) for k, v in base.items()}
        save_file(ft, str(d / f"{name}.safetensors"))
        models[name] = d / f"{name}.safetensors"
    tasks = flexmerge.load_tasks(d / "base.safetensors", models)
    flexmerge.save(flexmerge.merge(tasks, size=2.0), d / "art")
    assert flexmerge.load(d / "art").tasks == ["a", "b", "c"]
    return d


@contextlib.contextmanager
def hostile_copy(template: Path):
    """A fresh copy root/art of the artifact, with bait around it: root/secret.txt,
    root/outside.safetensors (a valid shard), root/outside_hf/config.json; and inside the copy,
    symlinks out: shard-00001.safetensors -> ../outside.safetensors, hf/a/config.json ->
    ../../../secret.txt, hf/b -> ../../outside_hf; plus an honest hf/c/config.json."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        art = root / "art"
        shutil.copytree(template / "art", art)
        (root / "secret.txt").write_text("secret")
        shutil.copy(template / "base.safetensors", root / "outside.safetensors")
        (root / "outside_hf").mkdir()
        (root / "outside_hf" / "config.json").write_text("{}")
        (art / "shard-00001.safetensors").symlink_to("../outside.safetensors")
        (art / "hf" / "a").mkdir(parents=True)
        (art / "hf" / "a" / "config.json").symlink_to("../../../secret.txt")
        (art / "hf" / "b").symlink_to("../../outside_hf")
        (art / "hf" / "c").mkdir()
        (art / "hf" / "c" / "config.json").write_text("{}")
        yield root, art


def load_recorded(art: Path) -> None:
    """`read_manifest` and `flexmerge.load` of `art`: FlexMergeError or success, opening nothing outside."""
    with recording_opens(with_safe_open=True) as opened:
        manifest = call(read_manifest, art)
        model = call(flexmerge.load, art)
    assert_opened_only_inside(opened, art)
    if manifest is not None:
        assert isinstance(manifest, dict)
    if model is not None:
        assert manifest is not None and model.tasks == manifest["tasks"]


@settings(max_examples=60, **FAST)
@given(blob=st.binary(max_size=256))
def test_manifest_of_arbitrary_bytes(artifact_template, blob):
    """manifest.json replaced by arbitrary bytes: load succeeds or raises FlexMergeError."""
    with hostile_copy(artifact_template) as (root, art):
        (art / "manifest.json").write_bytes(blob)
        load_recorded(art)


MANIFEST_FIELDS = ["format", "flexmerge_version", "tasks", "method", "size", "unit_bytes", "stored_bytes",
                   "frozen_bytes", "granularity", "keys", "frozen", "blocks", "shards", "hf_tasks", "info"]


@settings(max_examples=80, **FAST)
@given(doc=json_values | st.dictionaries(st.sampled_from(MANIFEST_FIELDS), json_values, max_size=8).map(
    lambda m: {**m, "format": "flexmerge-artifact/1"}))
def test_manifest_of_arbitrary_json(artifact_template, doc):
    """manifest.json replaced by arbitrary JSON (also objects with the right 'format' and the
    manifest's field names holding arbitrary values): FlexMergeError or success, nothing outside opened."""
    with hostile_copy(artifact_template) as (root, art):
        (art / "manifest.json").write_bytes(dumps(doc))
        load_recorded(art)


# Where a mutation lands: a path of steps from the manifest's root. A string step is a dict key; an
# int step is an index into a list (modulo its length; appended to an empty one) or the n-th key of
# a dict (modulo its size).
idx = st.integers(0, 3)
mutation_sites = st.one_of(
    st.tuples(st.sampled_from(MANIFEST_FIELDS)),
    st.tuples(st.just("tasks"), idx),
    st.tuples(st.just("hf_tasks"), idx),
    st.tuples(st.just("frozen"), idx),
    st.tuples(st.just("shards"), idx),
    st.tuples(st.just("shards"), idx, st.sampled_from(["file", "bytes", "sha256"])),
    st.tuples(st.just("keys"), idx),
    st.tuples(st.just("keys"), idx, st.sampled_from(["shape", "dtype"])),
    st.tuples(st.just("blocks"), idx),
    st.tuples(st.just("blocks"), idx, st.sampled_from(["name", "stored_bytes", "parts", "groups", "has_base",
                                                         "stored"])),
    st.tuples(st.just("blocks"), idx, st.just("groups"), idx),
    st.tuples(st.just("blocks"), idx, st.just("groups"), idx, idx),
    st.tuples(st.just("blocks"), idx, st.just("stored"), idx),
    st.tuples(st.just("blocks"), idx, st.just("stored"), idx, st.sampled_from(["members", "masked", "scales"])),
    st.tuples(st.just("blocks"), idx, st.just("parts"), idx, st.sampled_from(["key", "rows"])),
)
OUTSIDE_SHARD_ABS = "<absolute path of root/outside.safetensors>"
hostile_strings = st.sampled_from([
    "../secret.txt", OUTSIDE_SHARD_ABS, "..", "/etc/passwd", ".", "", "a\0b",
    "../outside.safetensors", "shard-00001.safetensors", "hf/../../secret.txt", "shard-00000.safetensors/..",
    "shard-" + "0" * 300 + ".safetensors",
])
plausible_values = st.sampled_from([
    0, 1, 2, 3, -1, True, False, None, [], {}, [0], [0, 1, 2], [[0], [1], [2]], [[0, 1, 2]], [[0, 1], [1, 2]],
    ["a"], ["b"], ["c"], ["a", "b", "c"], ["a", "a"], "a", "torch.float32", "torch.uint8", [4, 4], [0, 2],
    [3, 1], {"members": [0, 1, 2], "masked": False, "scales": False},
    {"members": [2], "masked": True, "scales": True}, "layers.0.w", "embed.weight",
])
mutations = st.lists(
    st.tuples(mutation_sites, st.just("delete") | st.just("set"), json_values | hostile_strings | plausible_values),
    min_size=0, max_size=3,
)


def mutate(m: dict, site: tuple, op: str, value: Any) -> None:
    node: Any = m
    for i, step in enumerate(site):
        last = i == len(site) - 1
        if isinstance(node, dict) and isinstance(step, int):
            if not node:
                return
            step = sorted(node)[step % len(node)]
        elif isinstance(node, list) and isinstance(step, int):
            if not node:
                if last and op == "set":
                    node.append(value)
                return
            step %= len(node)
        elif not (isinstance(node, dict) and isinstance(step, str)):
            return  # an earlier mutation replaced this container by something else
        if last:
            if op == "delete":
                node.pop(step, None) if isinstance(node, dict) else node.pop(step)
            else:
                node[step] = value
            return
        if isinstance(node, dict) and step not in node:
            return
        node = node[step]


@settings(max_examples=200, **FAST)
@given(changes=mutations)
@example(changes=[])  # the valid artifact loads, opening only its own files
@example(changes=[(("keys", 0, "dtype"), "set", [1])])  # once: TypeError (unhashable)
@example(changes=[(("blocks", 0, "parts", 0, "key"), "set", ["layers.0.w"])])  # once: TypeError (unhashable)
@example(changes=[(("shards", 0, "file"), "set", "shard-" + "0" * 300 + ".safetensors")])  # once: OSError
@example(changes=[(("shards", 0, "file"), "set", "shard-00001.safetensors")])  # symlink out: refused
@example(changes=[(("hf_tasks",), "set", ["a", "b"])])  # side files through symlinks out: refused
@example(changes=[(("hf_tasks",), "set", ["c"])])  # an honest side file: loads
def test_mutated_manifest_never_escapes_the_artifact(artifact_template, changes):
    """The valid manifest with 0-3 values (top-level fields, tasks, hf_tasks, frozen, keys, shards[i],
    blocks[i] and their parts, groups and stored groups) replaced by arbitrary JSON, hostile names
    ('../secret.txt', the absolute path of a valid outside shard, '..', '/etc/passwd', a symlink out,
    an over-long name) or plausible-but-wrong values, or deleted: `flexmerge.load` of a fresh copy
    succeeds or raises FlexMergeError, and opens (os.open, open, safe_open) nothing outside the copy."""
    with hostile_copy(artifact_template) as (root, art):
        m = json.loads((art / "manifest.json").read_text())
        for site, op, value in changes:
            mutate(m, site, op, replace_sentinel(copy.deepcopy(value), OUTSIDE_SHARD_ABS,
                                                 str(root / "outside.safetensors")))
        (art / "manifest.json").write_bytes(dumps(m))
        load_recorded(art)


# The recorder itself ------------------------------------------------------------------------------

def test_the_open_recorder_sees_every_channel(tmp_path):
    """Guards the guard: opens through os.open (here via a symlink out of the root), io.open
    (pathlib) and the artifact loader's safe_open are all recorded and resolved, so the
    'nothing outside the root' assertions above cannot pass vacuously."""
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside.safetensors"
    save_file({"x": torch.zeros(1)}, str(outside))
    (root / "link.safetensors").symlink_to("../outside.safetensors")
    with recording_opens(with_safe_open=True) as opened:
        close(open_checkpoint(root / "link.safetensors"))
        outside.read_bytes()
        with read_module.safe_open(str(outside), framework="pt"):
            pass
    assert len(opened) >= 3
    with pytest.raises(AssertionError, match="opened outside"):
        assert_opened_only_inside(opened, root)
    assert_opened_only_inside(opened, tmp_path)


# Regressions: inputs that once let something other than a FlexMergeError escape ---------------

@pytest.mark.parametrize("header", [DEEP_HEADER, DEEP_OBJECT, dumps(UNHASHABLE_DTYPE),
                                    dumps({"w": {"dtype": {}, "shape": [], "data_offsets": [0, 0]}})],
                         ids=["deep-array", "deep-object", "dtype-list", "dtype-dict"])
def test_regression_safetensors_header_raw_exceptions(tmp_path, header):
    """Deeply nested header JSON (RecursionError) and an unhashable dtype (TypeError) are CheckpointErrors."""
    f = tmp_path / "x.safetensors"
    f.write_bytes(frame(header, b"\0" * 4))
    with pytest.raises(FlexMergeError):
        open_checkpoint(f)


@pytest.mark.parametrize("header", EMPTY_BUT_HUGE, ids=["dim-2**63", "dim-2**64", "dims-2**62x2**62"])
def test_regression_empty_tensor_with_dims_beyond_int64(tmp_path, header):
    """A 0-element tensor whose other dims overflow int64 (torch.empty would fail on it) is refused
    at open, or reads fine."""
    f = tmp_path / "x.safetensors"
    f.write_bytes(frame(dumps(header)))
    try:
        src = open_checkpoint(f)
    except FlexMergeError:
        return
    try:
        t = src.read("w")
    except FlexMergeError:
        return
    finally:
        close(src)
    assert list(t.shape) == header["w"]["shape"]


@pytest.mark.parametrize("doc", [DEEP_HEADER, HUGE_INT, dumps({"weight_map": {"a": LONG_NAME}}),
                                 dumps({"weight_map": {"a": "sub/" + LONG_NAME}})],
                         ids=["deep", "huge-int", "long-name", "long-name-in-subdir"])
def test_regression_shard_index_raw_exceptions(tmp_path, doc):
    """Deep JSON, an int literal of more than 4300 digits, and a shard name longer than NAME_MAX
    (pathlib raises ENAMETOOLONG on it) are errors of the index, not raw exceptions."""
    model = write_safetensors_model_dir(tmp_path)
    (model / "model.safetensors.index.json").write_bytes(doc)
    with pytest.raises(FlexMergeError):
        open_checkpoint(model)


@pytest.mark.parametrize("site,value", [(("keys", 0, "dtype"), [1]), (("keys", 0, "dtype"), {}),
                                        (("blocks", 0, "parts", 0, "key"), ["layers.0.w"]),
                                        (("shards", 0, "file"), "shard-" + "0" * 300 + ".safetensors")],
                         ids=["key-dtype-list", "key-dtype-dict", "part-key-list", "long-shard-name"])
def test_regression_manifest_raw_exceptions(artifact_template, site, value):
    """Unhashable dtypes and keys (TypeError in a membership test) and an over-long shard name
    (ENAMETOOLONG) are ArtifactErrors."""
    with hostile_copy(artifact_template) as (root, art):
        m = json.loads((art / "manifest.json").read_text())
        mutate(m, site, "set", value)
        (art / "manifest.json").write_bytes(dumps(m))
        with pytest.raises(FlexMergeError):
            flexmerge.load(art)
