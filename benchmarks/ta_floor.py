"""What a Task Arithmetic merge of the vs_mergekit job costs at the least, step by step, against
the warm-read floor: the per-element work every streaming pass of flexmerge does, timed alone.

    python benchmarks/ta_floor.py [--cache-dir DIR] [--large]

Rows (one process, page cache warm, the job of benchmarks/vs_mergekit.py): reading every input
byte (the floor); reading each tensor into a reused fp16 buffer (flexmerge's pread path); the
sha256 of every byte (the resume key); and one pass of task vectors in fp32 (convert, subtract
θ0, sum over the tasks), which the validation pass (with its Gram products) and the merge pass
each do once. A benchmark, not a test."""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import torch

from benchmarks.vs_mergekit import LARGE, SMALL, generate, read_all
from flexmerge.io.open import open_checkpoint
from flexmerge.io.source import read_rows_into

CHUNK = 4 * 1024 * 1024


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "flexmerge" / "vs_mergekit")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--large", action="store_true")
    args = ap.parse_args(argv)
    job = "large" if args.large else "small"
    dirs = generate(args.cache_dir / f"{job}-m{args.tasks}", LARGE if args.large else SMALL, args.tasks)
    files = [d / "model.safetensors" for d in dirs]
    base, *tasks = [open_checkpoint(f) for f in files]
    keys = [k for k in base.keys() if base.meta(k).numel > 0]
    bufs: dict = {}

    def buf(name, n, dtype):
        if name not in bufs or bufs[name].numel() < n:
            bufs[name] = torch.empty(n, dtype=dtype)
        return bufs[name][:n]

    def pieces():
        for k in keys:
            mt = base.meta(k)
            row = max(1, mt.numel // max(mt.shape[0], 1)) if mt.shape else 1
            rows = mt.shape[0] if mt.shape else 1
            step = max(1, CHUNK // row)
            for a in range(0, rows, step):
                yield k, (None if not mt.shape or (a == 0 and step >= rows) else (a, min(rows, a + step))), \
                    min(step, rows - a) * row, mt.dtype

    def read(src, k, rows, n, dtype):
        out = buf("raw", n, dtype)
        read_rows_into(src, k, rows, out)  # a flat buffer of the right byte count will do
        return out

    def reads():
        for k, rows, n, dt in pieces():
            for src in (base, *tasks):
                read(src, k, rows, n, dt)

    def hashes():
        hs = [hashlib.sha256() for _ in files]
        for k, rows, n, dt in pieces():
            for h, src in zip(hs, (base, *tasks)):
                h.update(memoryview(read(src, k, rows, n, dt).view(torch.uint8).numpy()))

    def one_pass():
        for k, rows, n, dt in pieces():
            b32 = buf("b32", n, torch.float32).copy_(read(base, k, rows, n, dt))
            d = buf("d", len(tasks) * n, torch.float32).view(len(tasks), n)
            for i, src in enumerate(tasks):
                d[i].copy_(read(src, k, rows, n, dt)).sub_(b32)
            d.sum(0)

    read_all(files)
    rows = [("warm read of every input byte (the floor)", timed(lambda: read_all(files))),
            ("pread into reused buffers", timed(reads)), ("sha256 of every byte (pread + hash)", timed(hashes)),
            ("one fp32 task-vector pass (pread, convert, − θ0, Σ)", timed(one_pass))]
    floor = rows[0][1]
    for name, s in rows:
        print(f"{name:55s} {s:7.2f} s  {s / floor:6.1f}x floor")


if __name__ == "__main__":
    main()
