"""Scale: plan + merge at 2x of M = 8 synthetic fine-tunes of a ~1.1B-parameter fp16 model.

Shapes follow TinyLlama-1.1B (22 layers, hidden 2048, MLP 5632, grouped KV, 32000 vocab);
each model is two safetensors shards with an index (2.2 GB per model, ~20 GB in all), written
once under --cache-dir and reused. Before each measurement the files' pages are dropped from
the page cache (posix_fadvise DONTNEED), so both the raw read and flexmerge read from disk.

    python benchmarks/scale.py [--tasks 8] [--executor local|threads|ray]

Prints the raw sequential read time and throughput of all inputs, then flexmerge's wall time
per phase, bytes read, read throughput and peak RSS (the timed run is a fresh process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, MLP, LAYERS, VOCAB, KV = 2048, 5632, 22, 32000, 256


def shapes() -> dict[str, tuple[int, ...]]:
    s: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        s.update({
            f"{p}.input_layernorm.weight": (HIDDEN,), f"{p}.self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            f"{p}.self_attn.k_proj.weight": (KV, HIDDEN), f"{p}.self_attn.v_proj.weight": (KV, HIDDEN),
            f"{p}.self_attn.o_proj.weight": (HIDDEN, HIDDEN), f"{p}.post_attention_layernorm.weight": (HIDDEN,),
            f"{p}.mlp.gate_proj.weight": (MLP, HIDDEN), f"{p}.mlp.up_proj.weight": (MLP, HIDDEN),
            f"{p}.mlp.down_proj.weight": (HIDDEN, MLP),
        })
    s.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    return s


def _tensor(key: str, shape, seed: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, key)) * 7919 + len(key))
    return scale * torch.randn(shape, generator=g)


def write_model(directory: Path, make) -> None:
    """Two shards + index, written to a temporary name and renamed when complete."""
    if (directory / "model.safetensors.index.json").exists():
        return
    directory.mkdir(parents=True, exist_ok=True)
    keys = list(shapes())
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: make(k) for k in part}, str(directory / name))
        weight_map.update({k: name for k in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def generate(root: Path, num_tasks: int) -> None:
    s = shapes()
    base = lambda k: _tensor(k, s[k], 0, 0.02)  # noqa: E731
    write_model(root / "base", lambda k: base(k).half())
    for t in range(num_tasks):
        write_model(root / f"task{t:02d}", lambda k, t=t: (base(k) + 1e-3 * (
            0.5 * _tensor(k, s[k], 1, 1.0) + _tensor(k, s[k], 100 + t, 1.0))).half())


def files(root: Path, num_tasks: int) -> list[Path]:
    dirs = [root / "base", *[root / f"task{t:02d}" for t in range(num_tasks)]]
    return sorted(f for d in dirs for f in d.glob("*.safetensors"))


def drop_cache(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(paths: list[Path]) -> tuple[float, int]:
    drop_cache(paths)
    buf = bytearray(64 << 20)
    total, t0 = 0, time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return time.perf_counter() - t0, total


def measure(root: Path, num_tasks: int, executor: str, out: Path) -> dict:
    os.environ["FLEXMERGE_NO_PROGRESS"] = "1"
    import flexmerge
    from flexmerge.api import load_for_merge
    from flexmerge.executors import get_executor

    drop_cache(files(root, num_tasks))
    ex = get_executor(executor)
    t0 = time.perf_counter()
    # the validation pass does what the merge needs of it (as merge_files does), timed on its own
    tasks = load_for_merge(root / "base", {f"task{t:02d}": root / f"task{t:02d}" for t in range(num_tasks)},
                           method="task_arithmetic", size=2.0, executor=ex)
    t1 = time.perf_counter()
    manifest = flexmerge.merge_to_disk(tasks, out, size=2.0, method="task_arithmetic", executor=ex,
                                       overwrite=True, resume=False)
    t2 = time.perf_counter()
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    return {"first_pass_s": t1 - t0, "plan_and_merge_s": t2 - t1, "total_s": t2 - t0,
            "bytes_read": sum(s.bytes_read for s in [tasks.base, *tasks.sources]),
            "parameters": sum(tasks.meta[k].numel for k in tasks.mergeable), "size": manifest["size"],
            "artifact_bytes": sum(s["bytes"] for s in manifest["shards"]), "peak_rss": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--executor", default="local", choices=["local", "threads", "ray"])
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "flexmerge" / "bench-1b")
    ap.add_argument("--out", type=Path, default=Path("/tmp/flexmerge-scale-2x"))
    ap.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure_only:
        print(json.dumps(measure(args.cache_dir, args.tasks, args.executor, args.out)))
        return
    t0 = time.perf_counter()
    generate(args.cache_dir, args.tasks)
    print(f"inputs ready in {time.perf_counter() - t0:.0f}s under {args.cache_dir}")
    paths = files(args.cache_dir, args.tasks)
    read_s, nbytes = raw_read(paths)
    print(f"raw sequential read of all inputs (cold): {nbytes / 1e9:.2f} GB in {read_s:.1f}s = {nbytes / read_s / 1e9:.2f} GB/s")
    cmd = [sys.executable, __file__, "--tasks", str(args.tasks), "--executor", args.executor,
           "--cache-dir", str(args.cache_dir), "--out", str(args.out), "--measure-only"]
    r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    print(f"flexmerge ({args.executor}): {r['parameters'] / 1e9:.2f}B mergeable parameters x {args.tasks} tasks, "
          f"TA at 2x -> {r['size']:.3f}x ({r['artifact_bytes'] / 1e9:.2f} GB written)")
    print(f"  first pass (validate + Gram): {r['first_pass_s']:.1f}s; plan + merge + write: {r['plan_and_merge_s']:.1f}s; "
          f"total {r['total_s']:.1f}s = {r['total_s'] / read_s:.2f}x the raw read")
    print(f"  bytes read {r['bytes_read'] / 1e9:.2f} GB ({r['bytes_read'] / nbytes:.2f}x the inputs), "
          f"{r['bytes_read'] / r['total_s'] / 1e9:.2f} GB/s; peak RSS {r['peak_rss'] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
