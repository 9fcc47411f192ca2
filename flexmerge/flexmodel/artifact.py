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
  hf/{task}/...          config/tokenizer files of Hugging Face inputs
Shards are written as blocks arrive, so memory holds one shard's worth at most; the directory
appears under its final name only once the manifest is written (see `_atomic`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flexmerge import __version__
from flexmerge._atomic import atomic_directory
from flexmerge.blocks import Block, Part, Partition
from flexmerge.errors import ArtifactError
from flexmerge.flexmodel.model import BlockStore, FlexModel, StoredGroup
from flexmerge.io.source import TensorMeta
from flexmerge.planning.path import Assignment

FORMAT = "flexmerge-artifact/1"
MANIFEST = "manifest.json"
SHARD_BYTES = 1 << 30
_DTYPES = {str(d): d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
                               torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}


class ShardWriter:
    """Collects tensors and writes a safetensors shard each time `shard_bytes` are buffered."""

    def __init__(self, directory: Path, shard_bytes: int = SHARD_BYTES):
        self.directory, self.shard_bytes = directory, shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.buffer[name] = tensor.contiguous()
        self.buffered += tensor.nbytes
        if self.buffered >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        name = f"shard-{len(self.shards):05d}.safetensors"
        path = self.directory / name
        save_file(_unshare(self.buffer), str(path))
        self.shards.append({"file": name, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
        self.buffer, self.buffered = {}, 0


def write_artifact(
    path: str | Path,
    *,
    tasks: list[str],
    partition: Partition,
    meta: dict[str, TensorMeta],
    frozen: dict[str, torch.Tensor],
    blocks: Iterable[BlockStore],
    assignment: Assignment,
    method: dict[str, Any],
    size: float,
    unit_bytes: int,
    info: dict[str, Any],
    hf_files: dict[str, dict[str, bytes]],
    overwrite: bool = False,
    shard_bytes: int = SHARD_BYTES,
) -> dict[str, Any]:
    """Write an artifact from blocks as they come (a generator streams); returns the manifest."""
    with atomic_directory(Path(path), overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, shard_bytes)
        block_entries, stored_bytes = [], 0
        for b, store in enumerate(blocks):
            block_entries.append(_block_entry(partition.blocks[b], store, assignment.groups[b]))
            stored_bytes += store.nbytes()
            for p, t in enumerate(store.base or []):
                writer.add(f"blocks.{b}.base.{p}", t)
            for g, group in enumerate(store.groups):
                for p, t in enumerate(group.tensors):
                    writer.add(f"blocks.{b}.groups.{g}.parts.{p}", t)
                for p, m in enumerate(group.masks or []):
                    writer.add(f"blocks.{b}.groups.{g}.masks.{p}", m)
                if group.scales is not None:
                    writer.add(f"blocks.{b}.groups.{g}.scales", group.scales)
        for key, t in frozen.items():
            writer.add(f"frozen.{key}", t)
        writer.flush()
        for task, files in hf_files.items():
            (tmp / "hf" / task).mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                (tmp / "hf" / task / name).write_bytes(data)
        manifest = {
            "format": FORMAT,
            "flexmerge_version": __version__,
            "tasks": tasks,
            "method": method,
            "size": size,
            "unit_bytes": unit_bytes,
            "stored_bytes": stored_bytes,
            "frozen_bytes": sum(t.nbytes for t in frozen.values()),
            "granularity": partition.granularity,
            "keys": {k: {"shape": list(m.shape), "dtype": str(m.dtype)} for k, m in meta.items()},
            "frozen": list(frozen),
            "blocks": block_entries,
            "shards": writer.shards,
            "hf_tasks": sorted(hf_files),
            "info": info,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def save(flex: FlexModel, path: str | Path, overwrite: bool = False) -> dict[str, Any]:
    return write_artifact(
        path, tasks=flex.tasks, partition=flex.partition, meta=flex.meta, frozen=flex.frozen,
        blocks=flex.blocks, assignment=flex.assignment, method=flex.method, size=flex.size,
        unit_bytes=flex.unit_bytes, info=flex.info, hf_files=flex.hf_files, overwrite=overwrite,
    )


def read_manifest(path: str | Path) -> dict[str, Any]:
    directory = Path(path)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: not a flex-model directory")
    mf = directory / MANIFEST
    if not mf.is_file():
        raise ArtifactError(f"{directory}: no {MANIFEST}; not a flex model, or an unfinished write")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mf}: corrupted manifest ({e})") from e
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mf}: unknown format {manifest.get('format')!r} (expected {FORMAT!r})")
    return manifest


def load(path: str | Path, verify: bool = True) -> FlexModel:
    """Load a flex model; `verify` checks every shard's size and sha256 against the manifest."""
    directory = Path(path)
    manifest = read_manifest(directory)
    tensors: dict[str, torch.Tensor] = {}
    for shard in manifest["shards"]:
        f = directory / shard["file"]
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
        return _assemble(manifest, tensors, directory)
    except KeyError as e:
        raise ArtifactError(f"{directory}: tensor {e} named by the manifest is missing from the shards") from e


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
                [tensors[f"{prefix}.parts.{p}"] for p in range(len(parts))],
                [tensors[f"{prefix}.masks.{p}"] for p in range(len(parts))] if s["masked"] else None,
                tensors[f"{prefix}.scales"] if s.get("scales") else None,
            ))
        stores.append(BlockStore(stored, base))
        groups.append(tuple(tuple(g) for g in entry["groups"]))
    hf_files = {}
    for task in manifest.get("hf_tasks", []):
        folder = directory / "hf" / task
        hf_files[task] = {f.name: f.read_bytes() for f in folder.iterdir()} if folder.is_dir() else {}
    return FlexModel(
        tasks=manifest["tasks"], partition=Partition(tuple(blocks), manifest["granularity"]), meta=meta,
        frozen={k: tensors[f"frozen.{k}"] for k in manifest["frozen"]}, blocks=stores,
        assignment=Assignment(tuple(groups)), method=manifest["method"], size=manifest["size"],
        unit_bytes=manifest["unit_bytes"], info=manifest.get("info", {}), hf_files=hf_files,
    )


def _block_entry(block: Block, store: BlockStore, groups) -> dict[str, Any]:
    return {
        "name": block.name,
        "parts": [{"key": p.key, "rows": list(p.rows) if p.rows else None} for p in block.parts],
        "groups": [list(g) for g in groups],
        "has_base": store.base is not None,
        "stored": [{"members": list(g.members), "masked": g.masked, "scales": g.scales is not None}
                   for g in store.groups],
    }


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
