"""Per-thread reusable buffers for streaming passes.

A fresh multi-MB tensor per chunk is served by glibc with `mmap`, so every 4 KiB page of it
page-faults and is zeroed by the kernel, on every chunk: on a 1B-parameter model this was two
thirds of the first pass's time. Passes that use each chunk at once (validation and Gram
matrices, elementwise merging) take their buffers from here instead. A buffer must not escape
the function that asked for it: the next request with the same name on the same thread
overwrites it. A name holds one buffer whatever the dtype asked for (bytes viewed as it), so
passes that run one after another share their temporaries: `TEMP_A`/`TEMP_B` are the
short-lived ones, filled and consumed within one call (trim mask, histogram bins, TIES masks).
"""

from __future__ import annotations

import threading

import torch

_local = threading.local()
TEMP_A, TEMP_B = "temp.a", "temp.b"
DELTAS = "pass.deltas"  # the (n, *chunk) task vectors of the chunk a pass works on


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    """An uninitialized tensor of `shape`, reusing this thread's buffer called `name` (one per
    device: a chunk merged on a GPU takes its temporaries there)."""
    bufs: dict = _local.__dict__.setdefault("bufs", {})
    if device is not None and device.type != "cpu":
        name = f"{name}@{device}"
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * dtype.itemsize
    buf = bufs.get(name)
    if buf is None or buf.numel() < nbytes:
        bufs.pop(name, None)  # free the old one before allocating its successor
        buf = bufs[name] = _allocate(-(-nbytes // 8), torch.float64, device).view(torch.uint8)  # 8-byte aligned
    return buf[:nbytes].view(dtype).view(shape)


def release() -> None:
    """Free this thread's buffers (after a pass, so they do not outlive it)."""
    _local.__dict__.pop("bufs", None)


def _allocate(numel: int, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    return torch.empty(numel, dtype=dtype, device=device)  # tests wrap it to count bytes
