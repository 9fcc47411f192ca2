"""The on-disk format of a flex-model artifact: names, manifest fields, checksums.

Both the writer (`flexmodel.write`) and the reader (`flexmodel.read`) take every file name, tensor
name and manifest entry from here, so the two cannot drift apart. Layout of a directory DIR:

  manifest.json          tasks, method, size, blocks with their parts and stored groups, keys,
                         frozen keys, shard checksums, provenance, flexmerge version
  shard-00000.safetensors ...  tensors named
      blocks.{b}.groups.{g}.parts.{p}   stored weights (plain) or unified vector (masked)
      blocks.{b}.groups.{g}.masks.{p}   bit-packed masks, uint8 (n, ⌈numel/8⌉)
      blocks.{b}.groups.{g}.scales      fp32 rescalers (n,)
      blocks.{b}.groups.{g}.residuals.{i}.{p}.{a|b|r}  a member's residual: factors a @ b, or r exactly
      blocks.{b}.base.{p}               θ0 of a block that has masked groups
      frozen.{key}                      parameters identical in all models, stored once
      tasks.{task}.{key}                a task's own parameters (heads, ...), never merged
  router.safetensors     a trained router, when one is attached
  hf/{task}/...          config/tokenizer files of Hugging Face inputs, each with its size and
                         sha256 in the manifest's `side_files` (artifacts written before issue 30
                         lack them: they load, unverified, with a note)
  journal.json           only while a resumable write is under way
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flexmerge.blocks import Partition
from flexmerge.errors import ArtifactError
from flexmerge.io.source import HF_SIDE_FILES, TensorMeta
from flexmerge.planning.path import Assignment
from flexmerge.size import ModelUnit
from flexmerge.version import __version__

FORMAT = "flexmerge-artifact/1"
MANIFEST = "manifest.json"
JOURNAL = "journal.json"
ROUTER_FILE = "router.safetensors"
HF_DIR = "hf"
SHARD_NAME = re.compile(r"shard-\d{5,}\.safetensors")
# the dtypes a manifest may name, by their name in it (str(dtype))
DTYPES = {str(d): d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
                              torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}


def shard_file_name(index: int) -> str:
    """The file of the `index`-th shard (matches `SHARD_NAME`)."""
    return f"shard-{index:05d}.safetensors"


def is_artifact_entry(name: str) -> bool:
    """Whether a name in an artifact directory is one flexmerge writes there (anything else is the user's)."""
    return name in (MANIFEST, JOURNAL, ROUTER_FILE, HF_DIR) or SHARD_NAME.fullmatch(name) is not None


def side_file_name(name: str) -> str:
    """`name` if it is a Hugging Face side file flexmerge stores; no other name is ever written."""
    if name not in HF_SIDE_FILES:
        raise ArtifactError(f"{name!r} is not a Hugging Face side file flexmerge stores ({', '.join(HF_SIDE_FILES)})")
    return name


# tensor names in the shards ------------------------------------------------------------------

def base_tensor(b: int, p: int) -> str:
    """θ0 of part `p` of block `b` (stored for blocks with masked groups)."""
    return f"blocks.{b}.base.{p}"


def part_tensor(b: int, g: int, p: int) -> str:
    """Stored weights (or unified vector) of part `p` of group `g` of block `b`."""
    return f"blocks.{b}.groups.{g}.parts.{p}"


def mask_tensor(b: int, g: int, p: int) -> str:
    """Bit-packed masks of part `p` of a masked group."""
    return f"blocks.{b}.groups.{g}.masks.{p}"


def scales_tensor(b: int, g: int) -> str:
    """The fp32 rescalers of a group."""
    return f"blocks.{b}.groups.{g}.scales"


def residual_tensor(b: int, g: int, member: int, p: int, factor: str) -> str:
    """One factor (see `residual_factor_names`) of a group member's residual of part `p`."""
    return f"blocks.{b}.groups.{g}.residuals.{member}.{p}.{factor}"


def residual_factor_names(count: int) -> tuple[str, ...]:
    """A residual is stored as factors a, b (residual = a @ b) or exactly as r."""
    return ("a", "b") if count == 2 else ("r",)


def frozen_tensor(key: str) -> str:
    """A parameter identical in all models, stored once."""
    return f"frozen.{key}"


def task_tensor(task: str, key: str) -> str:
    """A task's own parameter (a head, ...), never merged."""
    return f"tasks.{task}.{key}"


# manifest entries ----------------------------------------------------------------------------

def meta_entry(meta: TensorMeta) -> dict[str, Any]:
    """A key's shape and dtype as the manifest records them."""
    return {"shape": list(meta.shape), "dtype": str(meta.dtype)}


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


def side_file_entry(data: bytes) -> dict[str, Any]:
    """A side file's manifest entry: its size and sha256, checked at load like a shard's."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def sha256_file(path: Path) -> str:
    """The checksum a manifest records for a shard or router file (read in 4 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
