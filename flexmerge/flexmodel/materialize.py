"""Materialize a cut of the path: run the merging method block by block, store what it returns."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from flexmerge._scratch import DELTAS, scratch
from flexmerge.blocks import Partition
from flexmerge.device import resolve_device, to_device
from flexmerge.errors import ConfigError
from flexmerge.executors import get_executor
from flexmerge.flexmodel.model import BlockStore, FlexModel, StoredGroup, pack_masks
from flexmerge.io.adapters import AdapterSource
from flexmerge.io.side_files import own_side_files, pick_side_files, read_hf_side_files, with_options
from flexmerge.io.source import HF_SIDE_GROUPS, rows_shape
from flexmerge.methods.base import MergeMethod
from flexmerge.planning.path import Assignment
from flexmerge.preprocess import Pipeline, fitted_pipeline
from flexmerge.size import model_unit, point_size, stored_with_masks
from flexmerge.taskvec import CHUNK_ELEMENTS, Chunk, TaskSet, all_finite, as_taskset, for_executor


def materialize_blocks(
    tasks: TaskSet, partition: Partition, assignment: Assignment, method: MergeMethod, pipeline: Pipeline,
    executor=None, skip: set[int] = frozenset(), device=None,
) -> Iterator[tuple[int, BlockStore]]:
    """Yield (index, storage) of every block not in `skip`, computed by `executor`, merged on
    `device` ("cpu", "auto", "cuda[:N]"; the stores are always in host memory).

    Blocks come in the reverse of the order the validation pass read their tensors in: the page
    cache then still holds the first ones asked for, and a model that (partly) fits in memory is
    (partly) not read from disk twice. In-process, one block's tensors are alive at a time
    (plus what the consumer keeps)."""
    ex = get_executor(executor)
    device = resolve_device(device, ex)
    read_order = {k: i for i, k in enumerate(tasks.meta)}
    last_read = lambda b: max(read_order[p.key] for p in partition.blocks[b].parts)  # noqa: E731
    todo = sorted((b for b in range(len(partition)) if b not in skip), key=last_read, reverse=True)
    stores = ex.map(_block_job, todo, for_executor(tasks, ex), partition, assignment, method, pipeline, device,
                    desc="merging blocks")
    yield from zip(todo, stores)


def _block_job(tasks, partition: Partition, assignment: Assignment, method: MergeMethod, pipeline: Pipeline,
               device: torch.device, b: int) -> BlockStore:
    return materialize_block(as_taskset(tasks), partition, b, assignment.groups[b], method, pipeline, device)


def materialize_block(
    tasks: TaskSet, partition: Partition, b: int, groups, method: MergeMethod, pipeline: Pipeline,
    device: torch.device | None = None,
) -> BlockStore:
    """One block's storage: each merged group's task vectors go to `device` chunk by chunk, are
    merged there, and the result comes back to the host, where θ0 is added and it is cast to the
    storage dtype."""
    parts = partition.blocks[b].parts
    chunks = [Chunk(p.key, p.rows) for p in parts]
    numels = [p.numel(tasks.meta[p.key]) for p in parts]
    dtypes = [method.storage_dtype(tasks.meta[p.key].dtype) for p in parts]
    views = partition.blocks[b].views(tasks.meta)
    base: list[torch.Tensor] | None = None
    needs_base = any(stored_with_masks(method, len(g)) for g in groups)
    stored: list[StoredGroup] = []
    merged_all = premerged(tasks, method, parts)
    for g in groups:
        if merged_all is not None and len(g) == tasks.num_tasks:  # computed by the validation pass
            stored.append(StoredGroup(tuple(g), merged_all))
            _check_finite_result(stored[-1], partition.blocks[b].name, method)
            continue
        if len(g) == 1 or (method.uses_masks and not stored_with_masks(method, len(g))):
            stored += [StoredGroup((t,), [tasks.read_task(t, c).to(dt).contiguous() for c, dt in zip(chunks, dtypes)])
                       for t in g]
            continue
        if base is None:  # read once per block: every merged group's task vectors subtract it
            base = [tasks.read_base(c).contiguous() for c in chunks]
        group = method.for_group(g)
        result = group.merge_chunks(_member_deltas(tasks, pipeline, group, list(g), chunks, base, device),
                                    views).to_host()
        pieces = torch.split(result.delta, numels)
        if stored_with_masks(method, len(g)):
            masks = [pack_masks(m) for m in torch.split(result.masks, numels, dim=1)]
            tensors = [x.view(bt.shape).to(dt) for x, bt, dt in zip(pieces, base, dtypes)]
            scales = result.scales.float() if method.uses_scales else None
            stored.append(StoredGroup(tuple(g), tensors, masks, scales))
        elif method.uses_residuals:
            tensors = [plus_base(x, bt, dt) for x, bt, dt in zip(pieces, base, dtypes)]  # θ0 + shared
            residuals = [[tuple(f.to(dt).contiguous() for f in r) for r, dt in zip(member, dtypes)]
                         for member in result.residuals]
            stored.append(StoredGroup(tuple(g), tensors, residuals=residuals))
        else:
            tensors = [plus_base(x, bt, dt) for x, bt, dt in zip(pieces, base, dtypes)]  # θ0 + τ
            stored.append(StoredGroup(tuple(g), tensors))
        _check_finite_result(stored[-1], partition.blocks[b].name, method)
    return BlockStore(stored, [bt.to(dt) for bt, dt in zip(base, dtypes)] if needs_base else None)


def plus_base(delta: torch.Tensor, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """θ0 + τ in the storage dtype, the values of `delta.view(base.shape).add_(base).to(dtype)`
    (`delta`: contiguous fp32, overwritten). Slice by slice: adding an fp16 θ0 to fp32 τ upcasts
    θ0 into a temporary, here of one chunk instead of the whole tensor (113 MB for a 49152 × 576
    embedding), and each fp32 sum is converted while it is in cache."""
    x, b = delta.view(-1), base.reshape(-1)
    out = x if dtype == x.dtype else torch.empty(x.numel(), dtype=dtype)
    for s in range(0, x.numel(), CHUNK_ELEMENTS):
        piece = x[s:s + CHUNK_ELEMENTS].add_(b[s:s + CHUNK_ELEMENTS])
        if out is not x:
            out[s:s + CHUNK_ELEMENTS] = piece
    return out.view(base.shape)


def _check_finite_result(group: StoredGroup, block: str, method: MergeMethod) -> None:
    """A merge of finite inputs that is not finite (a huge λ, an overflow in fp16 storage) is an error,
    not an artifact of NaN/Inf weights."""
    factors = [f for member in group.residuals or [] for r in member for f in r]
    for t in [*group.tensors, *factors, *([group.scales] if group.scales is not None else [])]:
        if not all_finite(t):
            raise ConfigError(f"method {method.describe()} gives NaN or infinite weights in block {block!r} "
                              "(a hyperparameter too large, or values beyond the storage dtype's range)")


class AllTasksMerge:
    """The method's merge of all M tasks, key by key, done by the validation pass (a
    `PassObserver`): every block that the cut merges into one group then needs no second read of
    the inputs (at 1x, all of them). For elementwise methods without global preprocessing, whose
    merge of a chunk is final; what it keeps (θ0 + merged τ in the storage dtype, one copy of the
    mergeable weights) must fit `budget_bytes`, else it does not observe."""

    name = "all_tasks_merge"

    def __init__(self, method: MergeMethod, budget_bytes: int):
        self.method, self.budget = method, budget_bytes
        self.merged: dict[str, torch.Tensor] = {}

    @staticmethod
    def applies(method: MergeMethod) -> bool:
        return (method.elementwise and not method.pipeline().transforms and not method.uses_masks
                and not method.uses_residuals and not method.uses_untransformed)

    def begin(self, meta, num_tasks: int) -> bool:
        self.meta = meta
        floating = [m for m in meta.values() if m.dtype.is_floating_point]
        need = sum(m.numel * self.method.storage_dtype(m.dtype).itemsize for m in floating)
        return self.applies(self.method) and need <= self.budget

    def see(self, chunk: Chunk, base: torch.Tensor, deltas: torch.Tensor) -> None:
        """θ0 + merge(τ) of the chunk, as `materialize_block` computes it: the same chunks, the same
        merge, then `plus_base`'s fp32 add and cast (so the bits are the same; a test compares).
        `base` is θ0 in fp32 already, so the add upcasts nothing."""
        meta = self.meta[chunk.key]
        if chunk.key not in self.merged:
            self.merged[chunk.key] = torch.empty(meta.shape, dtype=self.method.storage_dtype(meta.dtype))
        out = self.merged[chunk.key]
        target = out if chunk.rows is None else out[chunk.rows[0]:chunk.rows[1]]
        rows = deltas.flatten(1)
        if self.method.needs_base:
            rows = torch.cat([rows, base.reshape(1, -1)])
        delta = self.method.for_key(chunk.key).merge(rows).delta.view(base.shape)
        target.copy_(torch.add(delta, base, out=scratch("premerge.sum", base.shape, delta.dtype)))

    def finish(self, tasks: TaskSet) -> dict[str, object]:
        keep = set(tasks.mergeable)
        return {"method": self.method.describe(), "tensors": {k: v for k, v in self.merged.items() if k in keep}}


def premerged(tasks: TaskSet, method: MergeMethod, parts) -> list[torch.Tensor] | None:
    """The block's merge of all tasks from the validation pass (`AllTasksMerge`), when it made one
    for this method and the block's parts are whole tensors (the chunks it saw)."""
    found = tasks.first_pass.get(AllTasksMerge.name)
    if not found or found["method"] != method.describe() or any(p.rows is not None for p in parts):
        return None
    tensors = found["tensors"]
    return [tensors[p.key] for p in parts] if all(p.key in tensors for p in parts) else None


def _member_deltas(tasks: TaskSet, pipeline: Pipeline, method: MergeMethod, members: list[int],
                   parts: list[Chunk], base: list[torch.Tensor],
                   device: torch.device | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """The members' task vectors on a block, chunk by chunk, as (part index, (n, d_i)) on `device`,
    against the block's θ0 (`base`, one tensor per part). Elementwise methods consume each chunk
    before the next, so one reused buffer holds them (no per-chunk page faults)."""
    for p, (part, part_base) in enumerate(zip(parts, base)):
        first_row = part.rows[0] if part.rows is not None else 0
        for c in tasks.chunks(part.key, part.rows):
            shape = rows_shape(tasks.meta[c.key].shape, c.rows)
            rows = part_base if c.rows is None else part_base[c.rows[0] - first_row: c.rows[1] - first_row]
            base32 = scratch("merge.base32", shape, tasks.compute_dtype).copy_(rows)
            out = scratch(DELTAS, (len(members), *shape), tasks.compute_dtype) if method.elementwise else None
            deltas = pipeline.deltas(tasks, c, members, base32=base32, out=out, device=device).flatten(1)
            if method.uses_untransformed:  # the raw task vectors below the transformed ones
                raw = to_device(tasks.deltas(c, members, base32=base32), device)
                deltas = torch.cat([deltas, raw.flatten(1)])
            if method.needs_base:  # θ0 below the task vectors
                deltas = torch.cat([deltas, to_device(base32, device).reshape(1, -1)])
            yield p, deltas


def materialize(
    tasks: TaskSet, partition: Partition, assignment: Assignment, method: MergeMethod,
    info: dict | None = None, executor=None, device=None, pipeline: Pipeline | None = None,
    tokenizer_source: str | None = None, chat_template: str | None = None,
) -> FlexModel:
    """The flex model of one assignment, in memory (`api.merge_to_disk` streams to disk instead),
    merged on `device` (see `materialize_blocks`); `pipeline`: the method's preprocessing, fitted
    on `tasks` already (else fitted here); `tokenizer_source`, `chat_template`: see `collect_hf_files`."""
    device = resolve_device(device, executor)
    if pipeline is None:
        pipeline = fitted_pipeline(tasks, method, device)
    stores = dict(materialize_blocks(tasks, partition, assignment, method, pipeline, executor, device=device))
    blocks = [stores[b] for b in range(len(partition))]
    size = point_size(tasks, partition, method, assignment.group_sizes())
    unit = model_unit(tasks, method)
    if method.data_dependent_size:  # the planned size was an upper bound; this is what is stored
        size = unit.of(sum(s.nbytes() for s in blocks) + tasks.specific_bytes())
    return FlexModel(
        tasks=list(tasks.names), partition=partition, meta=dict(tasks.meta),
        frozen={k: tasks.base.read(k) for k in tasks.frozen}, blocks=blocks, assignment=assignment,
        method=method.describe(),
        size=size,
        unit_bytes=unit.nbytes, info=dict(info or {}),
        hf_files=collect_hf_files(tasks, tokenizer_source, chat_template),
        specific={name: tasks.read_specific(t) for t, name in enumerate(tasks.names)},
    )


def collect_hf_files(tasks: TaskSet, tokenizer_source: str | None = None,
                     chat_template: str | None = None) -> dict[str, dict[str, bytes]]:
    """Per task, the Hugging Face side files its export carries: each group (config, generation
    config, tokenizer, chat template) from the task's fine-tune, or from the base when it has none.
    A PEFT adapter's own files are those its adapter directory holds (a config with the task's own
    labels, a tokenizer with added tokens). `tokenizer_source="base"`: every task carries the base's
    tokenizer and the base's vocab_size (the tasks must be loaded over the base's vocabulary when a
    fine-tune added tokens); None: the vocabulary the tasks were loaded over (`load_tasks`');
    `chat_template`: every task carries this chat template."""
    tokenizer_source = tokenizer_source or tasks.vocabulary
    if tokenizer_source not in TOKENIZER_SOURCES:
        raise ConfigError(f"tokenizer_source must be one of {', '.join(TOKENIZER_SOURCES)}, got {tokenizer_source!r}")
    _check_vocabulary(tasks, tokenizer_source)
    base = read_hf_side_files(tasks.base)
    if tokenizer_source == "base" and not any(n in base for n in HF_SIDE_GROUPS["tokenizer"]):
        raise ConfigError(f"tokenizer_source base: the base {tasks.base.path} has no tokenizer files beside it")
    out: dict[str, dict[str, bytes]] = {}
    for name, src in zip(tasks.names, tasks.sources):
        if isinstance(src, AdapterSource) or src.hf_dir is not None or tasks.base.hf_dir is not None:
            out[name] = with_options(pick_side_files(own_side_files(src), base), base, tokenizer_source == "base",
                                     chat_template)
    return out


TOKENIZER_SOURCES = ("tasks", "base")


def _check_vocabulary(tasks: TaskSet, tokenizer_source: str) -> None:
    """The tokenizer an export carries must know every row of its embeddings: tasks read over the
    base's vocabulary carry the base's, and the base's cannot go with rows a fine-tune added."""
    if tasks.vocabulary == "base" and tokenizer_source != "base":
        raise ConfigError("the tasks were loaded over the base's vocabulary (their added tokens dropped): their "
                          "exports carry the base's tokenizer; give tokenizer_source='base'")
    added = [(name, k) for name, own in tasks.specific.items() for k in own if k in tasks.meta]
    if tokenizer_source == "base" and added:
        name, k = added[0]
        raise ConfigError(f"tokenizer_source base: task {name!r} keeps rows it added to {k!r}, which the base's "
                          "tokenizer knows nothing of; load the tasks with vocabulary='base' to drop them")
