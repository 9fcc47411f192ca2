"""Connection exhaustion and slow clients against the real `flexmerge serve` (issue 30's probes).

    python benchmarks/serve_abuse.py ARTIFACT [--idle 1100] [--nofile 1024] [--hold-s 10] [-- SERVE FLAGS]
    python benchmarks/serve_abuse.py ARTIFACT --bodies

The server runs in a subprocess with RLIMIT_NOFILE lowered to --nofile (as `ulimit -n 1024` would).
Once it answers /health, --idle connections are opened to it, each sending one byte ("G") and then
nothing, and held for --hold-s seconds. Meanwhile a well-behaved client sends one /health and one
predict request after the other, each on a fresh connection with a 5 s timeout, and the script
reports their latency (p50, max) and how many failed; also the server's log growth (lines, bytes,
tracebacks) during the hold, its VmRSS before and during it, and how many of the idle connections
the server had closed by the end. A last probe sends a request's first line one byte a second and
reports when (if ever, within 30 s) the server closes it. Traffic goes to 127.0.0.1 only, every
connection is closed and the server is stopped at the end.

--bodies instead posts three validation bombs inside the default body limit (800k integers, 533k
empty strings, 133k unknown fields) and reports each answer's status, time and size, the worst
/health latency meanwhile and the server's VmRSS growth.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _proc import HOST, free_port, rss_mib  # a sibling module: the benchmarks run as scripts






def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def call(port: int, method: str, path: str, body: dict | None = None, timeout: float = 5.0) -> tuple[int, float]:
    """(status, seconds) of one request on a fresh connection; status 0 when it failed."""
    start = time.perf_counter()
    try:
        conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
        payload = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=payload, headers={"Content-Type": "application/json"} if body else {})
        status = conn.getresponse().status
        conn.close()
    except OSError:
        status = 0
    return status, time.perf_counter() - start


def start_server(artifact: str, port: int, nofile: int, log: Path, flags: list[str]) -> subprocess.Popen:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    cmd = [sys.executable, "-m", "flexmerge", "serve", artifact, "--port", str(port), *flags]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, preexec_fn=limit)


def wait_healthy(port: int, proc: subprocess.Popen, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        if call(port, "GET", "/health", timeout=2)[0] == 200:
            return
        time.sleep(0.2)
    raise SystemExit("server not healthy in time")


def open_idle(port: int, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.settimeout(5)
        try:
            s.connect((HOST, port))
            s.sendall(b"G")
        except OSError:
            s.close()
            continue
        socks.append(s)
    return socks


def answered_or_closed(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        s.recv(4096, socket.MSG_PEEK)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def slow_probe(port: int, limit_s: float = 30) -> float | None:
    """Seconds until the server closes a connection that sends one byte a second; None: never."""
    line = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    start = time.monotonic()
    with socket.create_connection((HOST, port), timeout=5) as s:
        for byte in line:
            if time.monotonic() - start > limit_s:
                return None
            try:
                s.sendall(bytes([byte]))
            except OSError:
                return time.monotonic() - start
            if answered_or_closed(s):
                return time.monotonic() - start
            s.setblocking(True)
            s.settimeout(5)
            time.sleep(1)
    return None


def body_probe(port: int, pid: int, task: str) -> dict[str, dict]:
    """Validation bombs inside the default body limit (1.6 MB): status, seconds, answer bytes, the
    worst /health latency while each ran (a blocked event loop shows here), VmRSS growth."""
    bodies = {"800k integers": {"inputs": [1] * 800_000}, "533k empty strings": {"inputs": [""] * 533_000},
              "133k unknown fields": {"inputs": ["x"], **{f"k{i}": 0 for i in range(133_000)}}}
    out = {}
    for name, payload in bodies.items():
        body = json.dumps(payload, separators=(",", ":")).encode()
        rss = rss_mib(pid)
        result: dict = {}

        def post() -> None:
            start = time.perf_counter()
            conn = http.client.HTTPConnection(HOST, port, timeout=120)
            conn.request("POST", f"/v1/tasks/{task}/predict", body=body, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            result.update(status=r.status, answer_bytes=len(r.read()), s=round(time.perf_counter() - start, 3))

        worker = threading.Thread(target=post)
        worker.start()
        worst = 0.0
        while worker.is_alive():
            worst = max(worst, call(port, "GET", "/health", timeout=120)[1])
            time.sleep(0.01)
        worker.join()
        out[name] = {"body_bytes": len(body), **result, "worst_health_s": round(worst, 3),
                     "rss_growth_mib": round(rss_mib(pid) - rss, 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--idle", type=int, default=1100)
    parser.add_argument("--nofile", type=int, default=1024)
    parser.add_argument("--hold-s", type=float, default=10)
    parser.add_argument("--no-slow", action="store_true", help="skip the slow-connection probe")
    parser.add_argument("--bodies", action="store_true", help="only the validation bombs (no connection probes)")
    parser.add_argument("flags", nargs="*", help="more `flexmerge serve` flags (after --)")
    args = parser.parse_args()
    # this process holds the idle connections: it needs descriptors for them
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.idle + 256)), hard))

    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="serve-abuse-")) / "server.log"
    proc = start_server(args.artifact, port, args.nofile, log, args.flags)
    socks: list[socket.socket] = []
    try:
        wait_healthy(port, proc)
        task = json.loads(_get(port, "/tasks"))["tasks"][0]["task"]
        if args.bodies:
            print(json.dumps(body_probe(port, proc.pid, task), indent=1))
            return
        rss0, fds0 = rss_mib(proc.pid), fd_count(proc.pid)
        size0 = log.stat().st_size
        lines0 = log.read_text(errors="replace").count("\n")
        t0 = time.monotonic()
        socks = open_idle(port, args.idle)
        opened_s = time.monotonic() - t0
        lat: list[float] = []
        failed = 0
        peak_rss, peak_fds = rss0, fds0
        while time.monotonic() - t0 < args.hold_s:
            for method, path, body in (("GET", "/health", None), ("POST", f"/v1/tasks/{task}/predict",
                                                                   {"inputs": ["the film was good"]})):
                status, seconds = call(port, method, path, body)
                if status == 200:
                    lat.append(seconds)
                else:
                    failed += 1
            peak_rss, peak_fds = max(peak_rss, rss_mib(proc.pid)), max(peak_fds, fd_count(proc.pid))
            time.sleep(0.05)
        closed = sum(answered_or_closed(s) for s in socks)
        text = log.read_text(errors="replace")
        grown = text[len(text.encode()[:size0].decode(errors="replace")):]
        report = {
            "idle_opened": len(socks), "open_s": round(opened_s, 2), "nofile": args.nofile,
            "ok_requests": len(lat), "failed_requests": failed,
            "p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
            "max_ms": round(1000 * max(lat), 1) if lat else None,
            "log_bytes": log.stat().st_size - size0, "log_lines": text.count("\n") - lines0,
            "tracebacks": grown.count("Traceback"),
            "rss_mib_before": round(rss0, 1), "rss_mib_peak": round(peak_rss, 1),
            "fds_before": fds0, "fds_peak": peak_fds, "idle_closed_by_server": closed,
        }
        for s in socks:
            s.close()
        socks = []
        time.sleep(0.5)
        report["health_after"] = call(port, "GET", "/health")[0]
        if not args.no_slow:
            report["slow_closed_after_s"] = slow_probe(port)
        print(json.dumps(report, indent=1))
        guard = [line for line in grown.splitlines() if "connection guard" in line or "Traceback" in line][:6]
        print("guard lines:\n  " + "\n  ".join(guard))
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def _get(port: int, path: str) -> str:
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    conn.request("GET", path)
    return conn.getresponse().read().decode()


if __name__ == "__main__":
    main()
