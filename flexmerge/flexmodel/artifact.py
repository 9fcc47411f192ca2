"""The flex-model artifact: safetensors shards + manifest.json, written atomically.

Layout of a directory DIR:
  manifest.json          tasks, method, size, blocks with their parts and stored groups, keys,
                         frozen keys, shard checksums, provenance, flexmerge version
  shard-00000.safetensors ...  tensors named
      blocks.{b}.groups.{g}.parts.{p}   stored weights (plain) or unified vector (masked)
      blocks.{b}.groups.{g}.masks.{p}   bit-packed masks, uint8 (n, ⌈numel/8⌉)
      blocks.{b}.groups.{g}.scales      fp32 rescalers (n,)
      blocks.{b}.base.{p}               θ0 of a block that has masked groups
      frozen.{key}                      parameters identical in all models, stored once
      tasks.{task}.{key}                a task's own parameters (heads, ...), never merged
  hf/{task}/...          config/tokenizer files of Hugging Face inputs
Shards are written as blocks arrive, so memory holds one shard's worth at most; the directory
appears under its final name only once the manifest is written (see `_atomic`).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flexmerge.version import __version__
from flexmerge._atomic import atomic_directory, write_text_atomic
from flexmerge.blocks import Block, Part, Partition
from flexmerge.errors import ArtifactError
from flexmerge.flexmodel.model import BlockStore, FlexModel, StoredGroup
from flexmerge.io.source import HF_SIDE_FILES, TensorMeta, rows_shape
from flexmerge.paths import UnsafePathError, check_task_name, inside
from flexmerge.planning.path import Assignment
from flexmerge.size import ModelUnit

FORMAT = "flexmerge-artifact/1"
MANIFEST = "manifest.json"
JOURNAL = "journal.json"
# The writer buffers one shard (safetensors puts the header, offsets included, before the data),
# and holds it while the next block is merged: its size adds to the peak memory of writing. At
# 128 MiB the 134M-parameter job's peak fits 1.2 GiB; smaller shards only add files (the bytes
# written and hashed are the same), larger ones held the whole artifact (1 GiB at 4x).
SHARD_BYTES = 128 << 20
_DTYPES = {str(d): d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
                               torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}


class ShardWriter:
    """Collects tensors and writes a safetensors shard each time `shard_bytes` are buffered.

    Blocks are closed with `end_block`; once a shard holding a block's last tensor is on disk,
    hashed and fsynced, `on_flush` receives the blocks completed by that flush (for the resume
    journal, which so never names a shard that a crash could lose). The hash and the fsync of a
    shard run on a thread of their own while the next blocks are merged (they only read the file:
    the tensors are released once serialized); leaving the `with` block settles the last one.
    """

    def __init__(self, directory: Path, shard_bytes: int = SHARD_BYTES, shards: list | None = None,
                 on_flush=None):
        self.directory, self.shard_bytes, self.on_flush = directory, shard_bytes, on_flush
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.shards: list[dict[str, Any]] = list(shards or [])
        self.open_blocks: dict[int, dict[str, Any]] = {}
        self._sealer: ThreadPoolExecutor | None = None
        self._sealing: tuple[Future, str, dict[int, dict[str, Any]]] | None = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.buffer[name] = tensor.contiguous()
        self.buffered += tensor.nbytes

    def end_block(self, b: int, entry: dict[str, Any]) -> None:
        self.open_blocks[b] = entry
        if self.buffered >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the buffered tensors as the next shard and start sealing it; the shard before it
        is then settled (its entry recorded, its blocks journaled)."""
        blocks, self.open_blocks = self.open_blocks, {}
        if not self.buffer:
            self._settle()
            if self.on_flush is not None:
                self.on_flush(blocks)
            return
        name = f"shard-{len(self.shards) + (self._sealing is not None):05d}.safetensors"
        path = self.directory / name
        write_safetensors(unshare(self.buffer), path)
        self.buffer, self.buffered = {}, 0
        if self._sealer is None:
            self._sealer = ThreadPoolExecutor(1, thread_name_prefix="flexmerge-seal")
        sealing = (self._sealer.submit(seal_file, path), name, blocks)
        self._settle()
        self._sealing = sealing

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, error_type, *_) -> None:
        """Settle the last shard, also after an error elsewhere (it was written whole, so a resume
        keeps its blocks); a failure to seal it then does not hide the first error."""
        try:
            if error_type is None:
                self._settle()
            else:
                with contextlib.suppress(Exception):
                    self._settle()
        finally:
            if self._sealer is not None:
                self._sealer.shutdown(wait=True, cancel_futures=True)
                self._sealer = None

    def _settle(self) -> None:
        if self._sealing is None:
            return
        future, name, blocks = self._sealing
        self._sealing = None
        size, digest = future.result()
        self.shards.append({"file": name, "bytes": size, "sha256": digest})
        if self.on_flush is not None:
            self.on_flush(blocks)


def seal_file(path: Path) -> tuple[int, str]:
    """(size, sha256) of a written file, after an fsync: on disk before anything refers to it."""
    digest = sha256_file(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        return os.fstat(f.fileno()).st_size, digest


@dataclass
class ArtifactHeader:
    """Everything of a manifest that is known before the blocks are merged."""

    tasks: list[str]
    partition: Partition
    meta: dict[str, TensorMeta]
    assignment: Assignment
    method: dict[str, Any]
    size: float
    unit: ModelUnit
    info: dict[str, Any]
    hf_files: dict[str, dict[str, bytes]]
    specific: dict[str, dict[str, TensorMeta]] = field(default_factory=dict)  # task -> its own keys
    size_from_stored: bool = False  # the method's storage depends on the data: `size` was a bound

    def job_key(self, frozen_keys: list[str]) -> str:
        """Identifies a merge job, so that only the same job resumes from a partial directory (a GPU
        merge's bits may differ from a CPU merge's: the device it runs on is part of the job)."""
        job = {"tasks": self.tasks, "method": self.method, "blocks": self.partition.names(),
               "groups": [list(map(list, g)) for g in self.assignment.groups], "frozen": frozen_keys,
               "inputs": self.info.get("inputs"), "version": __version__,
               "specific": {t: sorted(k) for t, k in self.specific.items()}}
        if self.info.get("device"):
            job["device"] = self.info["device"]
        blob = json.dumps(job, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


BlockProducer = Callable[[set[int]], Iterable[tuple[int, BlockStore]]]


def write_artifact(
    path: str | Path,
    header: ArtifactHeader,
    frozen: dict[str, torch.Tensor],
    produce: BlockProducer,
    *,
    overwrite: bool = False,
    shard_bytes: int = SHARD_BYTES,
    resumable: bool = False,
    specific: Callable[[], Iterable[tuple[str, dict[str, torch.Tensor]]]] = lambda: (),
) -> dict[str, Any]:
    """Write an artifact from blocks as they are produced; returns the manifest.

    `produce(done)` yields (block index, storage) for the blocks not in `done`. With
    `resumable`, the work directory is `.<name>.partial-<job>` beside the target and a journal
    records the blocks whose shards are on disk: rerunning the same job after a crash skips them.
    """
    path = Path(path)
    job = header.job_key(list(frozen))
    partial = path.with_name(f".{path.name}.partial-{job}") if resumable else None
    for task in {*header.hf_files, *header.specific}:
        check_task_name(task, "artifact")
    with atomic_directory(path, overwrite=overwrite, partial=partial, replaceable=is_artifact,
                          what="a flex-model artifact") as tmp:
        shards, entries = _resume_state(tmp, job) if resumable else ([], {})

        def journal(completed: dict[int, dict[str, Any]]) -> None:
            entries.update(completed)
            if resumable:
                write_text_atomic(tmp / JOURNAL, json.dumps({"job": job, "shards": writer.shards,
                                                             "blocks": {str(b): e for b, e in entries.items()}}))

        with ShardWriter(tmp, shard_bytes, shards, on_flush=journal) as writer:
            _write_blocks(writer, header, frozen, produce(set(entries)))
            specific_bytes = _write_specific(writer, specific())
            writer.flush()
        for task, files in header.hf_files.items():
            (tmp / "hf" / task).mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                (tmp / "hf" / task / side_file_name(name)).write_bytes(data)
        stored_bytes = sum(entries[b]["stored_bytes"] for b in entries)
        manifest = {
            "format": FORMAT,
            "flexmerge_version": __version__,
            "tasks": header.tasks,
            "method": header.method,
            "size": header.unit.of(stored_bytes + specific_bytes) if header.size_from_stored else header.size,
            "unit_bytes": header.unit.nbytes,
            "stored_bytes": stored_bytes,
            "frozen_bytes": sum(t.nbytes for t in frozen.values()),
            "task_specific_bytes": specific_bytes,
            "task_specific": {t: {k: {"shape": list(m.shape), "dtype": str(m.dtype)} for k, m in own.items()}
                              for t, own in header.specific.items() if own},
            "granularity": header.partition.granularity,
            "keys": {k: {"shape": list(m.shape), "dtype": str(m.dtype)} for k, m in header.meta.items()},
            "frozen": list(frozen),
            "blocks": [entries[b] for b in range(len(header.partition))],
            "shards": writer.shards,
            "hf_tasks": sorted(header.hf_files),
            "info": header.info,
        }
        try:
            text = json.dumps(manifest, indent=1, allow_nan=False)
        except ValueError as e:
            raise ArtifactError(f"{path}: the manifest would hold a NaN or infinite number ({e})") from None
        (tmp / JOURNAL).unlink(missing_ok=True)
        (tmp / MANIFEST).write_text(text)
        for stale in path.parent.glob(f".{glob.escape(path.name)}.partial-*"):  # other jobs' interrupted runs
            if stale != tmp and stale.is_dir() and not stale.is_symlink():  # (we hold the target's lock)
                shutil.rmtree(stale, ignore_errors=True)
    return manifest


def _write_blocks(writer: ShardWriter, header: ArtifactHeader, frozen: dict[str, torch.Tensor],
                  produced: Iterable[tuple[int, BlockStore]]) -> None:
    """Each block's stored tensors (θ0 copies, groups, masks, scales, residual factors) as it is
    merged, then the frozen parameters."""
    for b, store in produced:
        for p, t in enumerate(store.base or []):
            writer.add(f"blocks.{b}.base.{p}", t)
        for g, group in enumerate(store.groups):
            for p, t in enumerate(group.tensors):
                writer.add(f"blocks.{b}.groups.{g}.parts.{p}", t)
            for p, m in enumerate(group.masks or []):
                writer.add(f"blocks.{b}.groups.{g}.masks.{p}", m)
            if group.scales is not None:
                writer.add(f"blocks.{b}.groups.{g}.scales", group.scales)
            for i, member in enumerate(group.residuals or []):
                for p, factors in enumerate(member):
                    for name, t in zip(_factor_names(factors), factors):
                        writer.add(f"blocks.{b}.groups.{g}.residuals.{i}.{p}.{name}", t)
        writer.end_block(b, _block_entry(header.partition.blocks[b], store, header.assignment.groups[b]))
    for key, t in frozen.items():
        writer.add(f"frozen.{key}", t)


def _write_specific(writer: ShardWriter, specific: Iterable[tuple[str, dict[str, torch.Tensor]]]) -> int:
    """The tasks' own parameters, one task at a time; returns their bytes."""
    nbytes = 0
    for task, own in specific:
        for key, t in own.items():
            writer.add(f"tasks.{task}.{key}", t)
            nbytes += t.nbytes
        if writer.buffered >= writer.shard_bytes:
            writer.flush()
    return nbytes


def _resume_state(tmp: Path, job: str) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]]]:
    """Shards and block entries of an interrupted run of the same job, if they verify; else a clean slate."""
    shards: list[dict[str, Any]] = []
    entries: dict[int, dict[str, Any]] = {}
    jf = tmp / JOURNAL
    if jf.is_file():
        try:
            j = json.loads(jf.read_text())
            ok = j.get("job") == job and all(
                (tmp / s["file"]).is_file() and (tmp / s["file"]).stat().st_size == s["bytes"]
                and sha256_file(tmp / s["file"]) == s["sha256"] for s in j["shards"])
            if ok:
                shards, entries = j["shards"], {int(b): e for b, e in j["blocks"].items()}
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    keep = {s["file"] for s in shards}
    for f in tmp.iterdir():  # anything not vouched for by the journal is redone
        if f.name not in keep and f.name != JOURNAL:
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    return shards, entries


def save(flex: FlexModel, path: str | Path, overwrite: bool = False) -> dict[str, Any]:
    specific_meta = {t: {k: TensorMeta(tuple(v.shape), v.dtype) for k, v in own.items()}
                     for t, own in flex.specific.items()}
    header = ArtifactHeader(flex.tasks, flex.partition, flex.meta, flex.assignment, flex.method, flex.size,
                            ModelUnit.from_nbytes(flex.unit_bytes, len(flex.tasks)), flex.info, flex.hf_files,
                            specific_meta)  # flex.size is exact
    manifest = write_artifact(path, header, flex.frozen,
                              lambda done: ((b, s) for b, s in enumerate(flex.blocks) if b not in done),
                              overwrite=overwrite, specific=lambda: flex.specific.items())
    return attach_router(path, flex.router) if flex.router is not None else manifest


ROUTER_FILE = "router.safetensors"


def attach_router(path: str | Path, router) -> dict[str, Any]:
    """Store a trained router (`flexmerge.routing.RouterMLP`) in an existing artifact: its tensors in
    `router.safetensors`, its shape and checksum in the manifest (rewritten atomically)."""
    from flexmerge.routing import router_tensors

    directory = Path(path)
    manifest = read_manifest(directory)
    if router.shape["tasks"] != len(manifest["tasks"]):
        raise ArtifactError(f"{directory}: a router for {router.shape['tasks']} tasks, the artifact has "
                            f"{len(manifest['tasks'])}")
    tmp = directory / f".{ROUTER_FILE}.tmp"
    write_safetensors(router_tensors(router), tmp)
    os.replace(tmp, directory / ROUTER_FILE)
    f = directory / ROUTER_FILE
    manifest["router"] = {"file": ROUTER_FILE, "bytes": f.stat().st_size, "sha256": sha256_file(f), **router.shape}
    write_text_atomic(directory / MANIFEST, json.dumps(manifest, indent=1, allow_nan=False))
    return manifest


def _load_router(directory: Path, entry: dict[str, Any], verify: bool):
    from flexmerge.routing import router_from_tensors

    f = inside(directory, ROUTER_FILE, "router")
    if not f.is_file() or f.stat().st_size != entry["bytes"] or (verify and sha256_file(f) != entry["sha256"]):
        raise ArtifactError(f"{f}: missing, truncated or corrupted (the manifest's size/checksum differ)")
    try:
        with safe_open(str(f), framework="pt") as h:
            return router_from_tensors({k: h.get_tensor(k) for k in h.keys()}, entry)
    except Exception as e:
        raise ArtifactError(f"{f}: not the router the manifest describes ({e})") from e


def is_artifact(path: Path) -> bool:
    """Whether `path` is a flex-model directory holding only what flexmerge writes (what
    `--overwrite` may replace: a directory with files of the user's in it is not one)."""
    try:
        read_manifest(path)
    except ArtifactError:
        return False
    path = Path(path)
    ours = lambda f: f.name in (MANIFEST, JOURNAL, ROUTER_FILE) or SHARD_NAME.fullmatch(f.name) or f.name == "hf"  # noqa: E731
    return not path.is_symlink() and all(ours(f) for f in path.iterdir())


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """save_file, with its errors (a full disk, a read-only directory) as one naming the file."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as e:  # safetensors raises its own SafetensorError for I/O failures
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise ArtifactError(f"cannot write {path}: {e}") from None


MANIFEST_MAX_BYTES = 256 << 20
SHARD_NAME = re.compile(r"shard-\d{5,}\.safetensors")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a flex model, checked for structure (see `check_manifest`)."""
    directory = Path(path)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: not a flex-model directory")
    mf = directory / MANIFEST
    if not mf.is_file() or mf.is_symlink():
        raise ArtifactError(f"{directory}: no {MANIFEST}; not a flex model, or an unfinished write")
    try:
        with open(mf, "rb") as f:
            raw = f.read(MANIFEST_MAX_BYTES + 1)
        if len(raw) > MANIFEST_MAX_BYTES:
            raise ArtifactError(f"{mf}: larger than {MANIFEST_MAX_BYTES >> 20} MiB; not a manifest")
        manifest = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except OSError as e:
        raise ArtifactError(f"{mf}: cannot read ({e.strerror or e})") from e
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ArtifactError(f"{mf}: corrupted manifest ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ArtifactError(f"{mf}: unknown format {found!r} (expected {FORMAT!r})")
    problem = check_manifest(manifest)
    if problem:
        raise ArtifactError(f"{mf}: malformed manifest: {problem}")
    return manifest


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def check_manifest(m: dict[str, Any]) -> str | None:
    """What is structurally wrong with a manifest (None: nothing), so that loading it never fails
    half-way with a raw error, and no name in it can point outside the artifact."""
    def is_list(x, of=object):
        return isinstance(x, list) and all(isinstance(v, of) and not isinstance(v, bool) for v in x)

    for name, kind in (("tasks", list), ("method", dict), ("keys", dict), ("frozen", list), ("blocks", list),
                       ("shards", list), ("granularity", str), ("info", dict)):
        if not isinstance(m.get(name), kind):
            return f"field {name!r} is missing or not a {kind.__name__}"
    for name in ("size", "unit_bytes", "stored_bytes", "frozen_bytes"):
        if not isinstance(m.get(name), (int, float)) or isinstance(m.get(name), bool):
            return f"field {name!r} is missing or not a number"
    tasks = m["tasks"]
    try:
        for t in tasks:
            check_task_name(t)
    except UnsafePathError as e:
        return str(e)
    if len(set(tasks)) != len(tasks) or not tasks:
        return "'tasks' is empty or names a task twice"
    for k, v in m["keys"].items():
        if not _valid_meta(v, is_list):
            return f"key {k!r} has no valid shape and dtype"
    if not is_list(m["frozen"], str) or any(k not in m["keys"] for k in m["frozen"]):
        return "'frozen' names keys that are not in 'keys'"
    for shard in m["shards"]:
        if not (isinstance(shard, dict) and isinstance(shard.get("file"), str) and SHARD_NAME.fullmatch(shard["file"])
                and isinstance(shard.get("bytes"), int) and isinstance(shard.get("sha256"), str)):
            return f"shard entry {str(shard)[:80]!r} is not {{file: shard-NNNNN.safetensors, bytes, sha256}}"
    if len({s["file"] for s in m["shards"]}) != len(m["shards"]):
        return "a shard is listed twice"
    everyone = set(range(len(tasks)))
    for b, e in enumerate(m["blocks"]):
        problem = _check_block_entry(e, m["keys"], everyone, is_list)
        if problem:
            return f"block {b}: {problem}"
    hf = m.get("hf_tasks", [])
    if not is_list(hf, str) or any(t not in tasks for t in hf):
        return "'hf_tasks' names tasks that are not in 'tasks'"
    router = m.get("router")
    if router is not None and not (isinstance(router, dict) and router.get("file") == "router.safetensors"
                                   and all(isinstance(router.get(k), int) and not isinstance(router.get(k), bool)
                                           and router[k] > 0 for k in ("bytes", "features", "hidden", "tasks"))
                                   and router["tasks"] == len(tasks) and isinstance(router.get("sha256"), str)):
        return "'router' must be {file: router.safetensors, bytes, sha256, features, hidden, tasks = #tasks}"
    own = m.get("task_specific", {})
    if not isinstance(own, dict) or any(t not in tasks or not isinstance(keys, dict) for t, keys in own.items()):
        return "'task_specific' must map tasks of 'tasks' to their own keys"
    for keys in own.values():
        for k, v in keys.items():
            if not _valid_meta(v, is_list):
                return f"task-specific key {k!r} has no valid shape and dtype"
    return None


def _valid_meta(v: Any, is_list) -> bool:
    """A manifest's {"shape": [non-negative ints], "dtype": a known dtype name}."""
    return (isinstance(v, dict) and is_list(v.get("shape"), int) and all(x >= 0 for x in v["shape"])
            and isinstance(v.get("dtype"), str) and v["dtype"] in _DTYPES)


def _check_block_entry(e: Any, keys: dict[str, Any], everyone: set[int], is_list) -> str | None:
    if not (isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("parts"), list)
            and isinstance(e.get("groups"), list) and isinstance(e.get("stored"), list)
            and isinstance(e.get("has_base"), bool) and isinstance(e.get("stored_bytes"), int)):
        return "needs name, parts, groups, stored, has_base and stored_bytes"
    for p in e["parts"]:
        if not (isinstance(p, dict) and isinstance(p.get("key"), str) and p["key"] in keys):
            return f"part {str(p)[:80]!r} names no known key"
        rows = p.get("rows")
        shape = keys[p["key"]]["shape"]
        if rows is not None and not (is_list(rows, int) and len(rows) == 2 and shape
                                     and 0 <= rows[0] < rows[1] <= shape[0]):
            return f"part {p['key']!r} has rows {rows!r} outside its shape {shape}"
    for name in ("groups", "stored"):
        members = [g if name == "groups" else (g.get("members") if isinstance(g, dict) else None) for g in e[name]]
        if not all(is_list(g, int) and g for g in members):
            return f"'{name}' must be lists of task indices"
        flat = [t for g in members for t in g]
        if sorted(flat) != sorted(everyone):
            return f"'{name}' do not assign every task (0..{len(everyone) - 1}) exactly once"
    for s in e["stored"]:
        if not (isinstance(s.get("masked"), bool) and isinstance(s.get("scales"), bool)):
            return "a stored group needs 'masked' and 'scales' flags"
        if s["masked"] and not e["has_base"]:
            return "a masked group needs the block's base ('has_base')"
        if "residuals" in s:
            r = s["residuals"]
            if s["masked"] or not (isinstance(r, list) and len(r) == len(s["members"]) and all(
                    is_list(x, int) and len(x) == len(e["parts"]) and all(c in (1, 2) for c in x) for x in r)):
                return "'residuals' must give, per member and per part, 1 (exact) or 2 (factors), unmasked"
    return None


def load(path: str | Path, verify: bool = True) -> FlexModel:
    """Load a flex model; `verify` checks every shard's size and sha256 against the manifest.

    Only files the manifest names and that lie inside `path` (symlinks resolved) are read."""
    directory = Path(path)
    manifest = read_manifest(directory)
    tensors: dict[str, torch.Tensor] = {}
    for shard in manifest["shards"]:
        f = inside(directory, shard["file"], "shard")
        if not f.is_file():
            raise ArtifactError(f"{directory}: shard {shard['file']} is missing")
        if f.stat().st_size != shard["bytes"]:
            raise ArtifactError(f"{f}: {f.stat().st_size} bytes, the manifest says {shard['bytes']} (truncated?)")
        if verify and sha256_file(f) != shard["sha256"]:
            raise ArtifactError(f"{f}: checksum mismatch: the file is corrupted")
        try:
            with safe_open(str(f), framework="pt") as h:
                tensors.update({k: h.get_tensor(k) for k in h.keys()})
        except Exception as e:
            raise ArtifactError(f"{f}: unreadable shard ({e})") from e
    try:
        flex = _assemble(manifest, tensors, directory)
    except KeyError as e:
        raise ArtifactError(f"{directory}: tensor {e} named by the manifest is missing from the shards") from e
    except (ValueError, TypeError, IndexError, RuntimeError) as e:
        raise ArtifactError(f"{directory}: the shards do not fit the manifest ({e})") from e
    if "router" in manifest:
        flex.router = _load_router(directory, manifest["router"], verify)
    return flex


def _assemble(manifest: dict[str, Any], tensors: dict[str, torch.Tensor], directory: Path) -> FlexModel:
    meta = {k: TensorMeta(tuple(v["shape"]), _DTYPES[v["dtype"]]) for k, v in manifest["keys"].items()}
    blocks, stores, groups = [], [], []
    for b, entry in enumerate(manifest["blocks"]):
        parts = tuple(Part(p["key"], tuple(p["rows"]) if p["rows"] else None) for p in entry["parts"])
        blocks.append(Block(entry["name"], parts))
        base = [tensors[f"blocks.{b}.base.{p}"] for p in range(len(parts))] if entry["has_base"] else None
        stored = []
        for g, s in enumerate(entry["stored"]):
            prefix = f"blocks.{b}.groups.{g}"
            stored.append(StoredGroup(
                tuple(s["members"]),
                [_fitting(tensors[f"{prefix}.parts.{p}"], part, meta) for p, part in enumerate(parts)],
                [tensors[f"{prefix}.masks.{p}"] for p in range(len(parts))] if s["masked"] else None,
                tensors[f"{prefix}.scales"] if s.get("scales") else None,
                _residuals(tensors, prefix, s["residuals"], parts, meta) if "residuals" in s else None,
            ))
        stores.append(BlockStore(stored, base))
        groups.append(tuple(tuple(g) for g in entry["groups"]))
    return FlexModel(
        tasks=manifest["tasks"], partition=Partition(tuple(blocks), manifest["granularity"]), meta=meta,
        frozen={k: tensors[f"frozen.{k}"] for k in manifest["frozen"]}, blocks=stores,
        assignment=Assignment(tuple(groups)), method=manifest["method"], size=manifest["size"],
        unit_bytes=manifest["unit_bytes"], info=manifest.get("info", {}),
        hf_files={task: read_side_files(directory, task) for task in manifest.get("hf_tasks", [])},
        specific={task: {k: _fitting_meta(tensors[f"tasks.{task}.{k}"], k, v) for k, v in keys.items()}
                  for task, keys in manifest.get("task_specific", {}).items()},
    )


def _residuals(tensors: dict[str, torch.Tensor], prefix: str, counts: list[list[int]], parts: tuple[Part, ...],
               meta: dict[str, TensorMeta]) -> list[list[tuple[torch.Tensor, ...]]]:
    """Per member, per part, the stored residual factors, checked to rebuild the part's shape."""
    out = []
    for i, member in enumerate(counts):
        row = []
        for p, (count, part) in enumerate(zip(member, parts)):
            names = ("a", "b") if count == 2 else ("r",)
            factors = tuple(tensors[f"{prefix}.residuals.{i}.{p}.{n}"] for n in names)
            want = tuple(rows_shape(meta[part.key].shape, part.rows))
            got = tuple(factors[0].shape) if count == 1 else (factors[0].shape[0], factors[1].shape[-1])
            if got != want or (count == 2 and (factors[0].dim(), factors[1].dim(), factors[0].shape[1])
                                != (2, 2, factors[1].shape[0])):
                raise ValueError(f"residual {i} of {part.key!r} does not rebuild its shape {list(want)}")
            row.append(factors)
        out.append(row)
    return out


def _fitting_meta(t: torch.Tensor, key: str, want: dict[str, Any]) -> torch.Tensor:
    if list(t.shape) != want["shape"] or str(t.dtype) != want["dtype"]:
        raise ValueError(f"task-specific {key!r} is {list(t.shape)} {t.dtype}, the manifest says "
                         f"{want['shape']} {want['dtype']}")
    return t


def _fitting(t: torch.Tensor, part: Part, meta: dict[str, TensorMeta]) -> torch.Tensor:
    """A stored part, if its shape is the one the manifest's key and rows say."""
    want = rows_shape(meta[part.key].shape, part.rows)
    if tuple(t.shape) != tuple(want):
        raise ValueError(f"stored part of {part.key!r} has shape {list(t.shape)}, the manifest says {list(want)}")
    return t


SIDE_FILE_MAX_BYTES = 64 << 20


def read_side_files(directory: Path, task: str) -> dict[str, bytes]:
    """A task's Hugging Face config/tokenizer files: only the known names, only regular files
    inside the artifact (a symlink out of it is refused)."""
    folder = inside(directory, f"hf/{check_task_name(task, 'artifact')}", "side-file folder")
    out = {}
    for name in HF_SIDE_FILES:
        f = folder / name
        if not os.path.lexists(f):
            continue
        real = inside(directory, f"hf/{task}/{name}", "side file")
        if not real.is_file() or real.stat().st_size > SIDE_FILE_MAX_BYTES:
            raise ArtifactError(f"{f}: not a regular file of at most {SIDE_FILE_MAX_BYTES >> 20} MiB")
        out[name] = real.read_bytes()
    return out


def side_file_name(name: str) -> str:
    if name not in HF_SIDE_FILES:
        raise ArtifactError(f"{name!r} is not a Hugging Face side file flexmerge stores ({', '.join(HF_SIDE_FILES)})")
    return name


def _block_entry(block: Block, store: BlockStore, groups) -> dict[str, Any]:
    return {
        "name": block.name,
        "stored_bytes": store.nbytes(),
        "parts": [{"key": p.key, "rows": list(p.rows) if p.rows else None} for p in block.parts],
        "groups": [list(g) for g in groups],
        "has_base": store.base is not None,
        "stored": [{"members": list(g.members), "masked": g.masked, "scales": g.scales is not None,
                    **({"residuals": [[len(r) for r in member] for member in g.residuals]}
                       if g.residuals is not None else {})}
                   for g in store.groups],
    }


def _factor_names(factors: tuple[torch.Tensor, ...]) -> tuple[str, ...]:
    """A residual is stored as factors a, b (residual = a @ b) or exactly as r."""
    return ("a", "b") if len(factors) == 2 else ("r",)


def unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory; copy the later ones."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, t in tensors.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        out[k] = t.clone() if ident in seen else t
        seen.add(ident)
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
