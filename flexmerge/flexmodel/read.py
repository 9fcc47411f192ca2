"""Reading a flex-model artifact back, validated: the manifest, the shards, the side files, the router.

An artifact may come from anywhere, so nothing in it is trusted: the manifest is checked for
structure before any of it is used (`check_manifest`), shards are checked against their recorded
size and sha256, and only files the manifest names that lie inside the directory (symlinks
resolved) are opened. Every failure is an `ArtifactError` naming the file.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from flexmerge.blocks import Block, Part, Partition
from flexmerge.errors import ArtifactError, FlexMergeWarning
from flexmerge.flexmodel.format import (
    DTYPES,
    FORMAT,
    HF_DIR,
    MANIFEST,
    ROUTER_FILE,
    SHA256_HEX,
    SHARD_NAME,
    base_tensor,
    frozen_tensor,
    is_artifact_entry,
    mask_tensor,
    part_tensor,
    residual_factor_names,
    residual_tensor,
    scales_tensor,
    sha256_file,
    side_file_entry,
    task_tensor,
)
from flexmerge.flexmodel.model import BlockStore, FlexModel, StoredGroup
from flexmerge.io.source import HF_SIDE_FILES, TensorMeta, rows_shape
from flexmerge.paths import UnsafePathError, check_task_name, inside
from flexmerge.planning.path import Assignment
from flexmerge.routing import RouterMLP, router_from_tensors

# A real manifest is ~100 kB (a 0.5B model's 290 keys, 8 tasks); parsing 64 MiB of JSON takes ~2 s.
MANIFEST_MAX_BYTES = 64 << 20
SIDE_FILE_MAX_BYTES = 64 << 20
# Far above any merge of fine-tunes (the largest suite has 30), low enough that a manifest's checks,
# linear in tasks x blocks, take well under a second.
MAX_TASKS = 10_000


def is_artifact(path: Path) -> bool:
    """Whether `path` is a flex-model directory holding only what flexmerge writes (what
    `--overwrite` may replace: a directory with files of the user's in it is not one)."""
    try:
        read_manifest(path)
    except ArtifactError:
        return False
    path = Path(path)
    return not path.is_symlink() and all(is_artifact_entry(f.name) for f in path.iterdir())


# the manifest --------------------------------------------------------------------------------

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
    """JSON's NaN and Infinity are no numbers a manifest may hold."""
    raise ValueError(f"{name} is not a JSON number")


IsList = Callable[..., bool]


def check_manifest(m: dict[str, Any]) -> str | None:
    """What is structurally wrong with a manifest (None: nothing), so that loading it never fails
    half-way with a raw error, and no name in it can point outside the artifact."""
    def is_list(x, of=object):
        if of is int:  # the long lists (task indices): `type(v) is int` also excludes bool, faster
            return isinstance(x, list) and all(type(v) is int for v in x)
        return isinstance(x, list) and all(isinstance(v, of) and not isinstance(v, bool) for v in x)

    for name, kind in (("tasks", list), ("method", dict), ("keys", dict), ("frozen", list), ("blocks", list),
                       ("shards", list), ("granularity", str), ("info", dict), ("flexmerge_version", str)):
        if not isinstance(m.get(name), kind):
            return f"field {name!r} is missing or not a {kind.__name__}"
    for name in ("size", "unit_bytes", "stored_bytes", "frozen_bytes"):
        if not isinstance(m.get(name), (int, float)) or isinstance(m.get(name), bool):
            return f"field {name!r} is missing or not a number"
        if m[name] < 0 or (m[name] == 0 and name in ("size", "unit_bytes")):
            return f"field {name!r} is {m[name]!r}; sizes are above 0 (byte counts at least 0)"
    if not isinstance(m["method"].get("name"), str):
        return "'method' has no name"
    tasks = m["tasks"]
    if len(tasks) > MAX_TASKS:
        return f"'tasks' lists {len(tasks)} tasks; at most {MAX_TASKS}"
    try:
        for t in tasks:
            check_task_name(t)
    except UnsafePathError as e:
        return str(e)
    known = set(tasks)  # membership tests below: a list's would make the checks quadratic
    if len(known) != len(tasks) or not tasks:
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
    if not is_list(hf, str) or any(t not in known for t in hf):
        return "'hf_tasks' names tasks that are not in 'tasks'"
    problem = _check_side_file_entries(m.get("side_files"), hf)
    if problem:
        return problem
    router = m.get("router")
    if router is not None and not (isinstance(router, dict) and router.get("file") == ROUTER_FILE
                                   and all(isinstance(router.get(k), int) and not isinstance(router.get(k), bool)
                                           and router[k] > 0 for k in ("bytes", "features", "hidden", "tasks"))
                                   and router["tasks"] == len(tasks) and isinstance(router.get("sha256"), str)):
        return f"'router' must be {{file: {ROUTER_FILE}, bytes, sha256, features, hidden, tasks = #tasks}}"
    own = m.get("task_specific", {})
    if not isinstance(own, dict) or any(t not in known or not isinstance(keys, dict) for t, keys in own.items()):
        return "'task_specific' must map tasks of 'tasks' to their own keys"
    for keys in own.values():
        for k, v in keys.items():
            if not _valid_meta(v, is_list):
                return f"task-specific key {k!r} has no valid shape and dtype"
            shared = m["keys"].get(k)
            if shared is not None and (not v["shape"] or v["shape"][1:] != shared["shape"][1:]):
                return f"task-specific rows of {k!r} are {v['shape']}, not rows of its shared shape {shared['shape']}"
    return None


def _check_side_file_entries(entries: Any, hf_tasks: list[str]) -> str | None:
    """`side_files` (when present): for each task of `hf_tasks`, {known side-file name: {bytes, sha256}}."""
    if entries is None:
        return None
    if not isinstance(entries, dict) or sorted(entries) != sorted(hf_tasks):
        return "'side_files' must map each task of 'hf_tasks' to its files"
    for task, files in entries.items():
        if not isinstance(files, dict):
            return f"'side_files' of task {task!r} must map file names to {{bytes, sha256}}"
        for name, entry in files.items():
            if not (name in HF_SIDE_FILES and isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
                    and not isinstance(entry["bytes"], bool) and 0 <= entry["bytes"] <= SIDE_FILE_MAX_BYTES
                    and isinstance(entry.get("sha256"), str) and SHA256_HEX.fullmatch(entry["sha256"])):
                return f"side file {str(name)[:80]!r} of task {task!r} is not a known file with {{bytes, sha256}}"
    return None


def _valid_meta(v: Any, is_list: IsList) -> bool:
    """A manifest's {"shape": [non-negative ints], "dtype": a known dtype name}."""
    return (isinstance(v, dict) and is_list(v.get("shape"), int) and all(x >= 0 for x in v["shape"])
            and isinstance(v.get("dtype"), str) and v["dtype"] in DTYPES)


def _check_block_entry(e: Any, keys: dict[str, Any], everyone: set[int], is_list: IsList) -> str | None:
    """What is wrong with one block's manifest entry: its parts, its groups, its stored groups."""
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
        if sum(map(len, members)) != len(everyone) or set().union(*members) != everyone:
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


# the model -----------------------------------------------------------------------------------

def load(path: str | Path, verify: bool = True) -> FlexModel:
    """Load a flex model; `verify` checks every shard's size and sha256 against the manifest.

    Only files the manifest names and that lie inside `path` (symlinks resolved) are read."""
    directory = Path(path)
    manifest = read_manifest(directory)
    tensors = _read_shards(directory, manifest["shards"], verify)
    hf_files = _read_all_side_files(directory, manifest, verify)
    try:
        flex = _assemble(manifest, tensors, hf_files)
    except KeyError as e:
        raise ArtifactError(f"{directory}: tensor {e} named by the manifest is missing from the shards") from e
    except (ValueError, TypeError, IndexError, RuntimeError) as e:
        raise ArtifactError(f"{directory}: the shards do not fit the manifest ({e})") from e
    if "router" in manifest:
        flex.router = _load_router(directory, manifest["router"], verify)
    return flex


def _read_shards(directory: Path, shards: list[dict[str, Any]], verify: bool) -> dict[str, torch.Tensor]:
    """Every tensor of the shards the manifest lists, each shard checked against its entry first."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
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
    return tensors


def _assemble(manifest: dict[str, Any], tensors: dict[str, torch.Tensor],
              hf_files: dict[str, dict[str, bytes]]) -> FlexModel:
    """The FlexModel a checked manifest describes, from the shards' tensors (KeyError: one is missing)."""
    meta = {k: TensorMeta(tuple(v["shape"]), DTYPES[v["dtype"]]) for k, v in manifest["keys"].items()}
    blocks, stores, groups = [], [], []
    for b, entry in enumerate(manifest["blocks"]):
        parts = tuple(Part(p["key"], tuple(p["rows"]) if p["rows"] else None) for p in entry["parts"])
        blocks.append(Block(entry["name"], parts))
        base = [tensors[base_tensor(b, p)] for p in range(len(parts))] if entry["has_base"] else None
        stored = [_stored_group(tensors, b, g, s, parts, meta) for g, s in enumerate(entry["stored"])]
        stores.append(BlockStore(stored, base))
        groups.append(tuple(tuple(g) for g in entry["groups"]))
    return FlexModel(
        tasks=manifest["tasks"], partition=Partition(tuple(blocks), manifest["granularity"]), meta=meta,
        frozen={k: tensors[frozen_tensor(k)] for k in manifest["frozen"]}, blocks=stores,
        assignment=Assignment(tuple(groups)), method=manifest["method"], size=manifest["size"],
        unit_bytes=manifest["unit_bytes"], info=manifest.get("info", {}),
        hf_files=hf_files,
        specific={task: {k: _fitting_meta(tensors[task_tensor(task, k)], k, v) for k, v in keys.items()}
                  for task, keys in manifest.get("task_specific", {}).items()},
    )


def _stored_group(tensors: dict[str, torch.Tensor], b: int, g: int, s: dict[str, Any], parts: tuple[Part, ...],
                  meta: dict[str, TensorMeta]) -> StoredGroup:
    """Group `g` of block `b` as its manifest entry `s` describes it."""
    return StoredGroup(
        tuple(s["members"]),
        [_fitting(tensors[part_tensor(b, g, p)], part, meta) for p, part in enumerate(parts)],
        [tensors[mask_tensor(b, g, p)] for p in range(len(parts))] if s["masked"] else None,
        tensors[scales_tensor(b, g)] if s.get("scales") else None,
        _residuals(tensors, b, g, s["residuals"], parts, meta) if "residuals" in s else None,
    )


def _residuals(tensors: dict[str, torch.Tensor], b: int, g: int, counts: list[list[int]], parts: tuple[Part, ...],
               meta: dict[str, TensorMeta]) -> list[list[tuple[torch.Tensor, ...]]]:
    """Per member, per part, the stored residual factors, checked to rebuild the part's shape."""
    out = []
    for i, member in enumerate(counts):
        row = []
        for p, (count, part) in enumerate(zip(member, parts)):
            factors = tuple(tensors[residual_tensor(b, g, i, p, n)] for n in residual_factor_names(count))
            want = tuple(rows_shape(meta[part.key].shape, part.rows))
            got = tuple(factors[0].shape) if count == 1 else (factors[0].shape[0], factors[1].shape[-1])
            if got != want or (count == 2 and (factors[0].dim(), factors[1].dim(), factors[0].shape[1])
                                != (2, 2, factors[1].shape[0])):
                raise ValueError(f"residual {i} of {part.key!r} does not rebuild its shape {list(want)}")
            row.append(factors)
        out.append(row)
    return out


def _fitting_meta(t: torch.Tensor, key: str, want: dict[str, Any]) -> torch.Tensor:
    """A task-specific tensor, if its shape and dtype are the ones the manifest says."""
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


# side files and the router -------------------------------------------------------------------

def _read_all_side_files(directory: Path, manifest: dict[str, Any], verify: bool) -> dict[str, dict[str, bytes]]:
    """Every task's side files, checked against the manifest's `side_files` (with `verify`, their
    sha256 too): a config with swapped label names or a tokenizer with swapped ids is refused like a
    changed shard. An artifact written before side files were hashed loads with a note."""
    hf_tasks = manifest.get("hf_tasks", [])
    recorded = manifest.get("side_files")
    if hf_tasks and recorded is None:
        warnings.warn(f"{directory}: written before flexmerge hashed config and tokenizer files, so its tasks' "
                      "side files are not verified; merge again to record their checksums", FlexMergeWarning,
                      stacklevel=3)
    hf_root = inside(directory, HF_DIR, "side-file folder")
    folders = set(os.listdir(hf_root)) if hf_tasks and hf_root.is_dir() else set()  # one listing for all tasks
    files = {task: read_side_files(directory, task) if task in folders else {} for task in hf_tasks}
    for task in hf_tasks if recorded is not None else ():
        _check_side_files(directory / HF_DIR / task, files[task], recorded[task], verify)
    return files


def _check_side_files(folder: Path, files: dict[str, bytes], recorded: dict[str, Any], verify: bool) -> None:
    """A task's side files against the manifest's entries: the same names, sizes and checksums."""
    for name in sorted({*files, *recorded}):
        if name not in recorded:
            raise ArtifactError(f"{folder / name}: a side file the manifest does not list (added after the "
                                "artifact was written?)")
        if name not in files:
            raise ArtifactError(f"{folder / name}: missing; the manifest lists it")
        entry = side_file_entry(files[name]) if verify else {"bytes": len(files[name]), "sha256": None}
        if entry["bytes"] != recorded[name]["bytes"] or (verify and entry["sha256"] != recorded[name]["sha256"]):
            raise ArtifactError(f"{folder / name}: checksum mismatch: the file was changed after the artifact "
                                "was written")


def read_side_files(directory: Path, task: str) -> dict[str, bytes]:
    """A task's Hugging Face config/tokenizer files: only the known names, only regular files
    inside the artifact (a symlink out of it is refused)."""
    folder = inside(directory, f"{HF_DIR}/{check_task_name(task, 'artifact')}", "side-file folder")
    if not folder.is_dir():
        return {}
    present = set(os.listdir(folder))  # one listing, not a look-up per known name (10^4 tasks: 9 s)
    out = {}
    for name in HF_SIDE_FILES:
        f = folder / name
        if name not in present:
            continue
        real = inside(directory, f"{HF_DIR}/{task}/{name}", "side file")
        if not real.is_file() or real.stat().st_size > SIDE_FILE_MAX_BYTES:
            raise ArtifactError(f"{f}: not a regular file of at most {SIDE_FILE_MAX_BYTES >> 20} MiB")
        out[name] = real.read_bytes()
    return out


def _load_router(directory: Path, entry: dict[str, Any], verify: bool) -> RouterMLP:
    """The trained router an artifact holds, checked against its manifest entry."""
    f = inside(directory, ROUTER_FILE, "router")
    if not f.is_file() or f.stat().st_size != entry["bytes"] or (verify and sha256_file(f) != entry["sha256"]):
        raise ArtifactError(f"{f}: missing, truncated or corrupted (the manifest's size/checksum differ)")
    try:
        with safe_open(str(f), framework="pt") as h:
            return router_from_tensors({k: h.get_tensor(k) for k in h.keys()}, entry)
    except Exception as e:
        raise ArtifactError(f"{f}: not the router the manifest describes ({e})") from e
