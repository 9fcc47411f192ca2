"""Per-block Gram matrices of the task vectors, computed once in one streaming pass.

The whole constituent-similarity merge path depends only on these small (M, M) matrices.
"""

from __future__ import annotations

import torch

from flexmerge._scratch import DELTAS, release, scratch
from flexmerge.blocks import Partition
from flexmerge.device import to_host
from flexmerge.executors import get_executor
from flexmerge.io.source import rows_shape
from flexmerge.preprocess import Pipeline
from flexmerge.taskvec import TaskSet, as_taskset, for_executor


def block_grams(tasks: TaskSet, partition: Partition, pipeline: Pipeline | None = None, executor=None,
                device: torch.device | None = None) -> torch.Tensor:
    """(B, M, M) float64 Gram matrices: G[b, i, j] = <τ_i, τ_j> restricted to block b, the
    products computed on `device` (None: the host), the matrices returned on the host."""
    pipeline = pipeline or Pipeline()
    m = tasks.num_tasks
    grams = torch.zeros(len(partition), m, m, dtype=torch.float64)
    whole_tensors = all(p.rows is None for block in partition.blocks for p in block.parts)
    if not pipeline.transforms and whole_tensors and tasks.key_grams:
        for b, block in enumerate(partition.blocks):  # accumulated by the validation pass
            for p in block.parts:
                grams[b] += tasks.key_grams[p.key]
        return grams
    ex = get_executor(executor)
    for b, g in enumerate(ex.map(block_gram, range(len(partition)), for_executor(tasks, ex), partition, pipeline,
                                 device, desc="similarity pass")):
        grams[b] = g
    release()  # this thread's buffers do not outlive the pass
    return grams


def block_gram(tasks, partition: Partition, pipeline: Pipeline, device: torch.device | None, b: int) -> torch.Tensor:
    """One block's (M, M) Gram matrix, chunk by chunk, on `device` (runs in a worker too)."""
    ts = as_taskset(tasks)
    m = ts.num_tasks
    gram = None
    for p in partition.blocks[b].parts:
        for chunk in ts.chunks(p.key, p.rows):
            shape = (m, *rows_shape(ts.meta[chunk.key].shape, chunk.rows))
            d = pipeline.deltas(ts, chunk, out=scratch(DELTAS, shape, ts.compute_dtype), device=device).reshape(m, -1)
            if gram is None:  # on the device the chunks come on
                gram = torch.zeros(m, m, dtype=torch.float64, device=d.device)
            gram += (d @ d.T).double()
    return to_host(gram)


def cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Cosine matrices from Gram matrices (..., M, M); two all-zero vectors count as identical."""
    norms = gram.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    denom = norms.unsqueeze(-1) * norms.unsqueeze(-2)
    cos = torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.zeros((), dtype=gram.dtype))
    both_zero = (norms.unsqueeze(-1) == 0) & (norms.unsqueeze(-2) == 0)
    return torch.where(both_zero, torch.ones((), dtype=gram.dtype), cos).clamp(-1.0, 1.0)


def block_deltas(
    tasks: TaskSet, partition: Partition, block: int, pipeline: Pipeline | None = None,
    members: list[int] | None = None,
) -> torch.Tensor:
    """Task vectors of `members` (default all) on one block, flattened: (n, D_block) fp32."""
    pipeline = pipeline or Pipeline()
    pieces = [pipeline.deltas(tasks, c, members).flatten(1)
              for p in partition.blocks[block].parts for c in tasks.chunks(p.key, p.rows)]
    return torch.cat(pieces, dim=1)


def block_base(tasks: TaskSet, partition: Partition, block: int) -> torch.Tensor:
    """θ0 on one block, flattened in the order of `block_deltas`: (D_block,) fp32."""
    return torch.cat([tasks.read_base(c).to(tasks.compute_dtype).flatten()
                      for p in partition.blocks[block].parts for c in tasks.chunks(p.key, p.rows)])
