"""Run as a script by test_scale.py: plan/merge a large model in a fresh process and report
(1) peak live bytes of the tensors that input data is read into (tracked allocations: fresh
reads and reused scratch buffers) and (2) RSS growth."""

from __future__ import annotations

import json
import os
import sys
import weakref
from pathlib import Path

import torch
from safetensors.torch import save_file

os.environ["FLEXMERGE_NO_PROGRESS"] = "1"
ROWS, COLS, TENSORS, TASKS = 2500, 1000, 16, 4  # one model: 40M fp32 parameters = 160 MB


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def generate(root: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.mlp.weight": torch.randn(ROWS, COLS, generator=g) for i in range(TENSORS)}
    save_file(base, str(root / "base.safetensors"))
    for t in range(TASKS):
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()},
                  str(root / f"t{t}.safetensors"))


def main(root: Path, method: str) -> None:
    import flexmerge
    from flexmerge import _scratch, taskvec
    from flexmerge.io.source import SafetensorsSource

    taskvec.CHUNK_ELEMENTS = 1 << 16  # 256 KB per model and chunk
    live = {"now": 0, "peak": 0}

    def track(t: torch.Tensor) -> torch.Tensor:
        live["now"] += t.nbytes
        live["peak"] = max(live["peak"], live["now"])
        weakref.finalize(t, lambda n=t.nbytes: live.__setitem__("now", live["now"] - n))
        return t

    # Every tensor that input data is read into: fresh reads, and the reused scratch buffers.
    read, allocate = SafetensorsSource._pread, _scratch._allocate
    SafetensorsSource._pread = lambda self, *args: track(read(self, *args))
    _scratch._allocate = lambda *args: track(allocate(*args))
    models = {f"t{t}": root / f"t{t}.safetensors" for t in range(TASKS)}
    before = rss_bytes()
    tasks = flexmerge.load_tasks(root / "base.safetensors", models)
    flexmerge.plan(tasks, method=method)
    plan_peak_live, plan_rss = live["peak"], peak_rss_bytes() - before
    flexmerge.merge_to_disk(tasks, root / f"out-{method}", size=2.0, method=method, shard_bytes=8 << 20,
                            overwrite=True)
    print(json.dumps({"model_bytes": tasks.mergeable_bytes(), "plan_peak_live": plan_peak_live, "plan_rss": plan_rss,
                      "merge_peak_live": live["peak"], "total_rss": peak_rss_bytes() - before,
                      "bytes_read": sum(s.bytes_read for s in [tasks.base, *tasks.sources])}))


if __name__ == "__main__":
    if sys.argv[2] == "generate":
        generate(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]), sys.argv[2])
