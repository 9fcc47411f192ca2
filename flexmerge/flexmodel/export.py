"""Export one task's full weights as a plain checkpoint: a safetensors file, or a directory laid out
as `save_pretrained` writes it (weights in shards of a bounded size with their index, config,
tokenizer, generation config, chat template) plus a model card (README.md)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from flexmerge._atomic import atomic_directory, write_bytes_atomic
from flexmerge.errors import ConfigError, UnknownNameError
from flexmerge.flexmodel.card import model_card
from flexmerge.flexmodel.format import side_file_name
from flexmerge.flexmodel.model import FlexModel
from flexmerge.flexmodel.write import unshare, write_safetensors
from flexmerge.io.source import HF_SIDE_FILES
from flexmerge.size import parse_bytes

EXPORT_MARK = "flexmerge_task"  # safetensors metadata key of every export: what --overwrite may replace
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
CARD = "README.md"
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers 4.x's save_pretrained default (5 writes 50GB); Hub-friendly files
OUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def export(flex: FlexModel, task: str, out: str | Path, overwrite: bool = False, *,
           out_dtype: str | None = None, max_shard_size: int | str | None = None) -> Path:
    """`out` ending in .safetensors: one file. Otherwise a directory: the weights (model.safetensors,
    or shards of at most `max_shard_size` with model.safetensors.index.json; default 5GB), a
    README.md model card and, when the inputs were Hugging Face directories, their side files.

    `out_dtype` (float32 | float16 | bfloat16) casts the floating-point weights (and the config's
    dtype). `overwrite` replaces only an earlier flexmerge export, never another file or directory."""
    out = Path(out)
    dtype = _out_dtype(out_dtype)
    state = {k: v.contiguous() for k, v in unshare(flex.state_dict(task)).items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    metadata = {"format": "pt", EXPORT_MARK: task, "flexmerge_size": f"{flex.size:.6f}"}
    if out.suffix == ".safetensors":
        if max_shard_size is not None:
            raise ConfigError(f"{out} is one .safetensors file; give a directory as --out to write shards")
        write_bytes_atomic(out, save(state, metadata=metadata), overwrite=overwrite,
                           replaceable=is_export_file, what="a flexmerge export")
        return out
    limit = shard_limit(max_shard_size)
    files = side_files(flex.hf_files.get(task, {}), out_dtype)
    with atomic_directory(out, overwrite=overwrite, replaceable=is_export_dir, what="a flexmerge export") as tmp:
        write_weights(state, tmp, metadata, limit)
        for name, data in files.items():
            (tmp / side_file_name(name)).write_bytes(data)
        library = "transformers" if "config.json" in files else None
        (tmp / CARD).write_text(model_card(flex, task, library=library, out_dtype=out_dtype), encoding="utf-8")
    return out


def _out_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in OUT_DTYPES:
        raise UnknownNameError("output dtype", name, OUT_DTYPES)
    return OUT_DTYPES[name]


def shard_limit(max_shard_size: int | str | None) -> int:
    """The largest weight file in bytes: `max_shard_size` (an int, or a size such as 5GB), or 5GB."""
    limit = parse_bytes(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
    if limit is None:
        return parse_bytes(DEFAULT_MAX_SHARD_SIZE)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise ConfigError(f"max_shard_size must be a positive size such as 5GB or 500MB, got {max_shard_size!r}")
    return limit


def plan_shards(state: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    """Keys per shard, in order, as transformers splits a state dict: a shard is closed when the
    next tensor would take it over `limit`; a tensor larger than `limit` gets a shard of its own."""
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for key, t in state.items():
        if t.nbytes > limit:
            shards.append([key])
            continue
        if current and used + t.nbytes > limit:
            shards.append(current)
            current, used = [], 0
        current.append(key)
        used += t.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def write_weights(state: dict[str, torch.Tensor], directory: Path, metadata: dict[str, str], limit: int) -> None:
    """model.safetensors when everything fits in `limit`; else model-0000i-of-0000n.safetensors
    and model.safetensors.index.json ({metadata: {total_size, total_parameters}, weight_map})."""
    shards = plan_shards(state, limit)
    if len(shards) == 1:
        write_safetensors(state, directory / WEIGHTS, metadata=metadata)
        return
    weight_map = {}
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors({k: state[k] for k in keys}, directory / name, metadata=metadata)
        weight_map.update({k: name for k in keys})
    index = {"metadata": {"total_size": sum(t.nbytes for t in state.values()),
                          "total_parameters": sum(t.numel() for t in state.values())},
             "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def side_files(files: dict[str, bytes], out_dtype: str | None) -> dict[str, bytes]:
    """The task's side files; with `out_dtype`, config.json says that dtype (so `dtype="auto"`
    loads what is stored). A config.json that is not a JSON object is copied as it is."""
    files = dict(files)
    if out_dtype is None or "config.json" not in files:
        return files
    try:
        config = json.loads(files["config.json"])
    except (ValueError, RecursionError):
        return files
    if isinstance(config, dict):
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
        config.update({k: out_dtype for k in keys})
        files["config.json"] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    return files


def is_export_file(path: Path, mark: str = EXPORT_MARK) -> bool:
    """A regular safetensors file that a flexmerge export wrote (its metadata has `mark`)."""
    if not path.is_file() or path.is_symlink():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return mark in (f.metadata() or {})
    except Exception:  # any unreadable file is simply not an export
        return False


def is_export_dir(path: Path) -> bool:
    """A directory that a flexmerge export wrote and that holds nothing else: every entry a regular
    file of an export's names (weights or shards, index, card, side files), every weight file marked."""
    if not path.is_dir() or path.is_symlink():
        return False
    entries = list(path.iterdir())
    known = {WEIGHTS, INDEX, CARD, *HF_SIDE_FILES}
    if not all(f.is_file() and not f.is_symlink() and (f.name in known or SHARD.fullmatch(f.name)) for f in entries):
        return False
    weights = [f for f in entries if f.name == WEIGHTS or SHARD.fullmatch(f.name)]
    return bool(weights) and all(is_export_file(f) for f in weights)
