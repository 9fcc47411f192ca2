"""Writing a flex-model artifact: journaled, resumable, atomic.

Shards are written as blocks arrive, so memory holds one shard's worth at most; the directory
appears under its final name only once the manifest is written (see `_atomic`). With `resumable`,
a journal records the blocks whose shards are sealed (hashed and fsynced), and a rerun of the
same job after a crash starts from them. The names and fields written come from `flexmodel.format`.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from flexmerge._atomic import atomic_directory, write_text_atomic
from flexmerge.blocks import Block
from flexmerge.errors import ArtifactError
from flexmerge.flexmodel.format import (
    FORMAT,
    HF_DIR,
    JOURNAL,
    MANIFEST,
    ROUTER_FILE,
    ArtifactHeader,
    base_tensor,
    frozen_tensor,
    mask_tensor,
    meta_entry,
    part_tensor,
    residual_factor_names,
    residual_tensor,
    scales_tensor,
    sha256_file,
    shard_file_name,
    side_file_entry,
    side_file_name,
    task_tensor,
)
from flexmerge.flexmodel.model import BlockStore, FlexModel
from flexmerge.flexmodel.read import is_artifact, read_manifest
from flexmerge.io.source import TensorMeta
from flexmerge.paths import check_task_name
from flexmerge.routing import RouterMLP, router_tensors
from flexmerge.size import ModelUnit
from flexmerge.version import __version__

# The writer buffers one shard (safetensors puts the header, offsets included, before the data),
# and holds it while the next block is merged: its size adds to the peak memory of writing. At
# 128 MiB the 134M-parameter job's peak fits 1.2 GiB; smaller shards only add files (the bytes
# written and hashed are the same), larger ones held the whole artifact (1 GiB at 4x).
SHARD_BYTES = 128 << 20

BlockProducer = Callable[[set[int]], Iterable[tuple[int, BlockStore]]]
TaskParameters = Iterable[tuple[str, dict[str, torch.Tensor]]]
BlockEntries = dict[int, dict[str, Any]]


class ShardWriter:
    """Collects tensors and writes a safetensors shard each time `shard_bytes` are buffered.

    Blocks are closed with `end_block`; once a shard holding a block's last tensor is on disk,
    hashed and fsynced, `on_flush` receives the blocks completed by that flush (for the resume
    journal, which so never names a shard that a crash could lose). The hash and the fsync of a
    shard run on a thread of their own while the next blocks are merged (they only read the file:
    the tensors are released once serialized); leaving the `with` block settles the last one.
    """

    def __init__(self, directory: Path, shard_bytes: int = SHARD_BYTES, shards: list | None = None,
                 on_flush: Callable[[BlockEntries], None] | None = None):
        self.directory, self.shard_bytes, self.on_flush = directory, shard_bytes, on_flush
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.shards: list[dict[str, Any]] = list(shards or [])
        self.open_blocks: BlockEntries = {}
        self._sealer: ThreadPoolExecutor | None = None
        self._sealing: tuple[Future, str, BlockEntries] | None = None

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
        name = shard_file_name(len(self.shards) + (self._sealing is not None))
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
        """Wait for the shard being sealed, record it and hand its blocks to `on_flush`."""
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


def write_artifact(
    path: str | Path,
    header: ArtifactHeader,
    frozen: dict[str, torch.Tensor],
    produce: BlockProducer,
    *,
    overwrite: bool = False,
    shard_bytes: int = SHARD_BYTES,
    resumable: bool = False,
    specific: Callable[[], TaskParameters] = lambda: (),
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

        def journal(completed: BlockEntries) -> None:
            entries.update(completed)
            if resumable:
                write_text_atomic(tmp / JOURNAL, json.dumps({"job": job, "shards": writer.shards,
                                                             "blocks": {str(b): e for b, e in entries.items()}}))

        with ShardWriter(tmp, shard_bytes, shards, on_flush=journal) as writer:
            _write_blocks(writer, header, frozen, produce(set(entries)))
            specific_bytes = _write_specific(writer, specific())
            writer.flush()
        _write_side_files(tmp, header.hf_files)
        manifest = _manifest(header, frozen, entries, writer.shards, specific_bytes)
        try:
            text = json.dumps(manifest, indent=1, allow_nan=False)
        except ValueError as e:
            raise ArtifactError(f"{path}: the manifest would hold a NaN or infinite number ({e})") from None
        (tmp / JOURNAL).unlink(missing_ok=True)
        (tmp / MANIFEST).write_text(text)
        _remove_other_partials(path, keep=tmp)
    return manifest


def _manifest(header: ArtifactHeader, frozen: dict[str, torch.Tensor], entries: BlockEntries,
              shards: list[dict[str, Any]], specific_bytes: int) -> dict[str, Any]:
    """The manifest of a written artifact (its field order is part of the bytes written)."""
    stored_bytes = sum(entries[b]["stored_bytes"] for b in entries)
    return {
        "format": FORMAT,
        "flexmerge_version": __version__,
        "tasks": header.tasks,
        "method": header.method,
        "size": header.unit.of(stored_bytes + specific_bytes) if header.size_from_stored else header.size,
        "unit_bytes": header.unit.nbytes,
        "stored_bytes": stored_bytes,
        "frozen_bytes": sum(t.nbytes for t in frozen.values()),
        "task_specific_bytes": specific_bytes,
        "task_specific": {t: {k: meta_entry(m) for k, m in own.items()} for t, own in header.specific.items() if own},
        "granularity": header.partition.granularity,
        "keys": {k: meta_entry(m) for k, m in header.meta.items()},
        "frozen": list(frozen),
        "blocks": [entries[b] for b in range(len(header.partition))],
        "shards": shards,
        "hf_tasks": sorted(header.hf_files),
        **({"side_files": {task: {name: side_file_entry(data) for name, data in sorted(files.items())}
                           for task, files in sorted(header.hf_files.items())}} if header.hf_files else {}),
        "info": header.info,
    }


def _write_blocks(writer: ShardWriter, header: ArtifactHeader, frozen: dict[str, torch.Tensor],
                  produced: Iterable[tuple[int, BlockStore]]) -> None:
    """Each block's stored tensors (θ0 copies, groups, masks, scales, residual factors) as it is
    merged, then the frozen parameters."""
    for b, store in produced:
        for p, t in enumerate(store.base or []):
            writer.add(base_tensor(b, p), t)
        for g, group in enumerate(store.groups):
            for p, t in enumerate(group.tensors):
                writer.add(part_tensor(b, g, p), t)
            for p, m in enumerate(group.masks or []):
                writer.add(mask_tensor(b, g, p), m)
            if group.scales is not None:
                writer.add(scales_tensor(b, g), group.scales)
            for i, member in enumerate(group.residuals or []):
                for p, factors in enumerate(member):
                    for name, t in zip(residual_factor_names(len(factors)), factors):
                        writer.add(residual_tensor(b, g, i, p, name), t)
        writer.end_block(b, _block_entry(header.partition.blocks[b], store, header.assignment.groups[b]))
    for key, t in frozen.items():
        writer.add(frozen_tensor(key), t)


def _block_entry(block: Block, store: BlockStore, groups: Iterable[Iterable[int]]) -> dict[str, Any]:
    """A block's manifest entry: its parts, task groups and what each stored group holds."""
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


def _write_specific(writer: ShardWriter, specific: TaskParameters) -> int:
    """The tasks' own parameters, one task at a time; returns their bytes."""
    nbytes = 0
    for task, own in specific:
        for key, t in own.items():
            writer.add(task_tensor(task, key), t)
            nbytes += t.nbytes
        if writer.buffered >= writer.shard_bytes:
            writer.flush()
    return nbytes


def _write_side_files(directory: Path, hf_files: dict[str, dict[str, bytes]]) -> None:
    """Each Hugging Face input's config/tokenizer files under hf/{task}/."""
    for task, files in hf_files.items():
        (directory / HF_DIR / task).mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (directory / HF_DIR / task / side_file_name(name)).write_bytes(data)


def _resume_state(tmp: Path, job: str) -> tuple[list[dict[str, Any]], BlockEntries]:
    """Shards and block entries of an interrupted run of the same job, if they verify; else a clean slate."""
    shards: list[dict[str, Any]] = []
    entries: BlockEntries = {}
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


def _remove_other_partials(path: Path, keep: Path) -> None:
    """Other jobs' interrupted runs of the same target (we hold the target's lock)."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.partial-*"):
        if stale != keep and stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


def save(flex: FlexModel, path: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write a FlexModel held in memory as an artifact (with its router, if it has one)."""
    specific_meta = {t: {k: TensorMeta(tuple(v.shape), v.dtype) for k, v in own.items()}
                     for t, own in flex.specific.items()}
    header = ArtifactHeader(flex.tasks, flex.partition, flex.meta, flex.assignment, flex.method, flex.size,
                            ModelUnit.from_nbytes(flex.unit_bytes, len(flex.tasks)), flex.info, flex.hf_files,
                            specific_meta)  # flex.size is exact
    manifest = write_artifact(path, header, flex.frozen,
                              lambda done: ((b, s) for b, s in enumerate(flex.blocks) if b not in done),
                              overwrite=overwrite, specific=lambda: flex.specific.items())
    return attach_router(path, flex.router) if flex.router is not None else manifest


def attach_router(path: str | Path, router: RouterMLP) -> dict[str, Any]:
    """Store a trained router (`flexmerge.routing.RouterMLP`) in an existing artifact: its tensors in
    `router.safetensors`, its shape and checksum in the manifest (rewritten atomically)."""
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


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """save_file, with its errors (a full disk, a read-only directory) as one naming the file."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as e:  # safetensors raises its own SafetensorError for I/O failures
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise ArtifactError(f"cannot write {path}: {e}") from None


def unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory; copy the later ones."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, t in tensors.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        out[k] = t.clone() if ident in seen else t
        seen.add(ident)
    return out
