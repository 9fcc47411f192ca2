"""FlexModel: the shared stored tensors of one point of the path, and per-task views of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from flexmerge.blocks import Partition
from flexmerge.errors import ConfigError
from flexmerge.io.source import TensorMeta
from flexmerge.methods.twin import rebuild
from flexmerge.planning.path import Assignment
from flexmerge.taskvec import with_own


@dataclass
class StoredGroup:
    """One stored tensor set of a block, read by `members`.

    Plain: `tensors` are the weights themselves (per part). Masked: `tensors` are the unified
    task vector, `masks` the members' bit-packed masks (n, ⌈numel/8⌉) and `scales` optional
    per-member rescalers; member i reads θ0 + scale_i · unpack(mask_i) ⊙ tensor. With residuals
    (Twin-Merging): `tensors` are θ0 + shared and member i reads tensor + A·B (or + R) of
    `residuals[i][p]`.
    """

    members: tuple[int, ...]
    tensors: list[torch.Tensor]
    masks: list[torch.Tensor] | None = None
    scales: torch.Tensor | None = None
    residuals: list[list[tuple[torch.Tensor, ...]]] | None = None  # [member][part]

    @property
    def masked(self) -> bool:
        return self.masks is not None

    def nbytes(self) -> int:
        n = sum(t.nbytes for t in self.tensors)
        n += sum(m.nbytes for m in self.masks or [])
        n += sum(t.nbytes for member in self.residuals or [] for r in member for t in r)
        return n + (self.scales.nbytes if self.scales is not None else 0)


@dataclass
class BlockStore:
    groups: list[StoredGroup]
    base: list[torch.Tensor] | None = None  # θ0 of the block's parts, kept when a group is masked

    def group_for(self, task: int) -> StoredGroup:
        for g in self.groups:
            if task in g.members:
                return g
        raise KeyError(task)

    def nbytes(self) -> int:
        return sum(g.nbytes() for g in self.groups) + sum(t.nbytes for t in self.base or [])


def pack_masks(masks: torch.Tensor) -> torch.Tensor:
    """(n, D) bool -> (n, ⌈D/8⌉) uint8, 1 bit per entry."""
    return torch.from_numpy(np.packbits(masks.numpy().astype(bool), axis=-1))


def unpack_mask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=numel).astype(bool))


@dataclass
class FlexModel:
    """A merged model of some size between 1× and M×: per task, a complete set of weights.

    Persistence lives beside it, not in it: `flexmerge.save`, `flexmerge.load`, `flexmerge.export`."""

    tasks: list[str]
    partition: Partition
    meta: dict[str, TensorMeta]  # every key of the checkpoints, in their order
    frozen: dict[str, torch.Tensor]
    blocks: list[BlockStore]
    assignment: Assignment
    method: dict[str, Any]
    size: float
    unit_bytes: float  # one fine-tune as stored (its own parameters included): the size unit
    info: dict[str, Any] = field(default_factory=dict)  # plan options, provenance, version
    hf_files: dict[str, dict[str, bytes]] = field(default_factory=dict)  # task -> config/tokenizer files
    specific: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # task -> its own parameters
    router: Any = None  # a trained `flexmerge.routing.RouterMLP` (Twin-Merging's routed inference), or None

    def with_own(self, task: str, shared: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`shared` weights (a mixture, say) with `task`'s own parameters put in (`taskvec.with_own`)."""
        return with_own(shared, self.specific.get(task, {}))

    def specific_bytes(self) -> int:
        """Bytes of the tasks' own parameters (heads, ...), stored once per task, outside the blocks."""
        return sum(t.nbytes for own in self.specific.values() for t in own.values())

    def stored_bytes(self) -> int:
        """Bytes of everything stored for the mergeable parameters (what `size` accounts)."""
        return sum(b.nbytes() for b in self.blocks)

    def groups_of(self, task: str) -> list[tuple[str, ...]]:
        t = self._index(task)
        return [tuple(self.tasks[i] for i in b.group_for(t).members) for b in self.blocks]

    def state_dict(self, task: str) -> dict[str, torch.Tensor]:
        """The task's full weights. Unsplit plain blocks return the stored tensors themselves."""
        t = self._index(task)
        pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for block, store in zip(self.partition.blocks, self.blocks):
            group = store.group_for(t)
            for p, part in enumerate(block.parts):
                tensor = self._read_part(store, group, t, p, part.key)
                pieces.setdefault(part.key, []).append((part.rows[0] if part.rows else 0, tensor))
        out: dict[str, torch.Tensor] = {}
        for key in self.meta:
            if key in self.frozen:
                out[key] = self.frozen[key]
            else:
                ordered = [x for _, x in sorted(pieces[key], key=lambda r: r[0])]
                out[key] = ordered[0] if len(ordered) == 1 else torch.cat(ordered)
        return with_own(out, self.specific.get(task, {}))

    def shared_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights every task starts from, without its own residual or mask: per block the
        tensors of its largest group (θ0 + shared for a residual group, θ0 + unified vector for a
        masked one). At a pure Twin-Merging point this is the reference's shared model θ*."""
        def read(store: BlockStore, p: int) -> torch.Tensor:
            g = max(store.groups, key=lambda x: len(x.members))
            return g.tensors[p] if not g.masked else (store.base[p].float() + g.tensors[p].float()).to(g.tensors[p].dtype)

        return self.assemble(read, self.specific.get(self.tasks[0], {}))

    def mixture_state_dict(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Σ_t w_t · (task t's weights) for mixture weights w (M,) summing to 1: at a Twin-Merging
        point θ0 + shared + Σ_t w_t · A_t B_t, the routed model of the reference. Task-specific
        parameters are not mixed (the caller picks a task's head)."""
        w = torch.as_tensor(weights, dtype=torch.float32).flatten()
        if len(w) != len(self.tasks) or not bool(torch.isfinite(w).all()) or abs(float(w.sum()) - 1) > 1e-4:
            raise ConfigError(f"mixture weights must be {len(self.tasks)} finite numbers summing to 1, got {w.tolist()}")

        return self.assemble(lambda store, p: self.mixed_part(store, p, w), {})

    def mixed_part(self, store: BlockStore, p: int, w: torch.Tensor) -> torch.Tensor:
        """Σ_t w_t · (task t's part `p` of the block stored in `store`), in the storage dtype."""
        acc = None
        for g in store.groups:
            if not g.masked and g.residuals is None:  # one tensor for every member: weigh it once
                term = g.tensors[p].float() * float(w[list(g.members)].sum())
            else:
                term = sum(self._read_part(store, g, t, p, "").float() * float(w[t]) for t in g.members)
            acc = term if acc is None else acc + term
        return acc.to(store.groups[0].tensors[p].dtype)

    def assemble(self, read, specific: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A full state dict from `read(store, part index)` per block part (row slices concatenated),
        the frozen keys and `specific` (a task's own parameters) put in."""
        pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for block, store in zip(self.partition.blocks, self.blocks):
            for p, part in enumerate(block.parts):
                pieces.setdefault(part.key, []).append((part.rows[0] if part.rows else 0, read(store, p)))
        out = {k: self.frozen[k] if k in self.frozen else torch.cat([x for _, x in sorted(pieces[k], key=lambda r: r[0])])
               for k in self.meta}
        return with_own(out, specific)

    def module(self, task: str, model: torch.nn.Module, strict: bool = True) -> torch.nn.Module:
        """Load the task's weights into `model` without copying: shared blocks share memory."""
        model.load_state_dict(self.state_dict(task), strict=strict, assign=True)
        return model

    def _index(self, task: str) -> int:
        if task not in self.tasks:
            raise ConfigError(f"unknown task {task!r}; this model serves: {', '.join(self.tasks)}")
        return self.tasks.index(task)

    def _read_part(self, store: BlockStore, group: StoredGroup, task: int, p: int, key: str) -> torch.Tensor:
        stored = group.tensors[p]
        if group.residuals is not None:
            residual = rebuild(group.residuals[group.members.index(task)][p]).view(stored.shape)
            return (stored.float() + residual).to(stored.dtype)
        if not group.masked:
            return stored
        i = group.members.index(task)
        mask = unpack_mask(group.masks[p][i], stored.numel()).view(stored.shape)
        delta = stored.float() * mask
        if group.scales is not None:
            delta = delta * group.scales[i]
        return (store.base[p].float() + delta).to(stored.dtype)
