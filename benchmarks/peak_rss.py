"""Where a flexmerge command's peak memory is: the CLI run in-process with a sampler thread that
reads VmRSS every 5 ms and keeps the main thread's stack at each new high; prints VmHWM, that
stack and the peak per 10 s. tracemalloc does not see torch's allocations; this does.

    python -m benchmarks.peak_rss merge --base B --model a=A ... --size 1 --out OUT --overwrite

A diagnostic, not a test (Linux: /proc/self/status)."""
import os, sys, threading, time, traceback
os.environ["FLEXMERGE_NO_PROGRESS"] = "1"
main_id = threading.get_ident()
log = []
best = [0, None]
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 2**20
def sampler():
    t0 = time.perf_counter()
    while True:
        r = rss()
        log.append((time.perf_counter() - t0, r))
        if r > best[0] + 0.005:
            fr = sys._current_frames().get(main_id)
            best[0] = r
            best[1] = [f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in traceback.extract_stack(fr)][-9:]
        time.sleep(0.005)
threading.Thread(target=sampler, daemon=True).start()
from flexmerge.cli import app
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    with open("/proc/self/status") as f:
        print(next(l for l in f if l.startswith("VmHWM")).strip())
    print(f"peak VmRSS {best[0]:.3f} GiB at:", *best[1], sep="\n  ")
    sec = {}
    for t, r in log:
        sec[int(t) // 10] = max(sec.get(int(t) // 10, 0), r)
    print("per 10 s:", " ".join(f"{v:.2f}" for k, v in sorted(sec.items())))
