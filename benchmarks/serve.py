"""Serving: resident memory and mixed-task throughput of `flexmerge serve` on the wordnet zoo, per size.

    python benchmarks/serve.py [--sizes 1,2,4,8] [--requests 800] [--rounds 8] [--concurrency 8]

For each size the zoo (8 MiniLM-L6 fine-tunes + heads, built or reused) is merged to an artifact
(cached under <cache>/served/) and served by the real server in a subprocess on 127.0.0.1:
`python -m flexmerge serve --suite wordnet --size S`. Once it answers /health (it has loaded and
warmed all 8 tasks) and a warm-up round of requests, its VmRSS is read from /proc/<pid>/status.
Then a fixed mixed-task stream (1 text per request, tasks round-robin, texts drawn with a seed from
the tasks' test glosses) is sent by --concurrency threads, each on its own keep-alive connection
and waiting for its answer before sending the next; throughput and p50/p99 latency are measured at
the client. All servers stay up (idle ones use no CPU) and the stream is sent in --rounds rounds,
each round visiting every server in a rotated order, so that a change in the machine's background
load falls on all of them alike; a server's throughput is its requests over its seconds, all rounds.

Baselines, served by the same server stack (`create_app` + `run_server`, same defaults) in a
subprocess of this script, with the same stream:
  single   one plain model: the base MiniLM encoder, one forward pass per batch, each row through
           its task's head (Linear 384 x k); what serving one model costs.
  separate the 8 fine-tuned encoders loaded separately (8 BertModel instances + heads), one
           forward pass per task present in a batch; what serving the zoo without merging costs.

Memory target: growth(size) = RSS(size) - overhead <= 1.1 x size x one model, where one model is
the encoder's mergeable bytes (the artifact's unit_bytes) and overhead = RSS(1x) - 1 x one model
(interpreter, torch, tokenizer, server, frozen embeddings, activations). Throughput target: the
mixed-task stream at each size >= 0.8 x the single model's. Traffic goes to 127.0.0.1 only; every
request has a timeout and every server is stopped at the end (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from _proc import HOST, MiB, free_ports, vm_status  # a sibling module: the benchmarks run as scripts


# --------------------------------------------------------------------------- baseline servers


class PlainModels:
    """The server's Runtime contract over plain models: `encoders[task]` (the same object for tasks
    that share one) and `heads[task]`; a batch runs one forward pass per distinct encoder."""

    def __init__(self, suite, encoders, heads, labels):
        self.suite, self.encoders, self.heads, self.labels = suite, encoders, heads, labels
        self.tasks = list(encoders)
        self.size = float(len({id(e) for e in encoders.values()}))

    def task_info(self, task):
        return {"task": task, "kind": "text-classification", "labels": self.labels[task]}

    def predict_mixed(self, items):
        import torch

        by_encoder: dict[int, list[int]] = {}
        for i, (task, _) in enumerate(items):
            by_encoder.setdefault(id(self.encoders[task]), []).append(i)
        results = [None] * len(items)
        with torch.inference_mode():
            for rows in by_encoder.values():
                encoder = self.encoders[items[rows[0]][0]]
                batch = self.suite.encode([items[i][1] for i in rows])
                features = self.suite.pooled(encoder, batch, torch.arange(len(rows)))
                for j, i in enumerate(rows):
                    task = items[i][0]
                    probs = torch.softmax(self.heads[task](features[j]).float(), -1)
                    best = int(probs.argmax())
                    names = self.labels[task]
                    results[i] = {"label": names[best], "score": float(probs[best]),
                                  "scores": {n: float(p) for n, p in zip(names, probs)}}
        return results


def serve_plain(kind: str, port: int, cache_dir: str | None) -> None:
    """Run a baseline server (`single` or `separate`) until SIGTERM."""
    from safetensors.torch import load_file

    from flexmerge.serve.server import create_app, run_server
    from flexmerge.suites import get_suite, get_zoo

    suite = get_suite("wordnet")
    zoo = get_zoo(suite, Path(cache_dir) if cache_dir else None)
    options = suite.serve_options(zoo)
    if kind == "single":
        base = suite.encoder().eval()
        base.load_state_dict(load_file(zoo.base))
        encoders = {t: base for t in zoo.tasks}
    else:
        encoders = {}
        for t in zoo.tasks:
            encoders[t] = suite.encoder().eval()
            encoders[t].load_state_dict(load_file(zoo.models[t]))
    runtime = PlainModels(suite, encoders, options["heads"], options["labels"])
    runtime.predict_mixed([(t, "warm up") for t in runtime.tasks])  # as `flexmerge serve` does
    run_server(create_app(runtime), host=HOST, port=port, log_level="info")


# --------------------------------------------------------------------------- client side






def post(conn: http.client.HTTPConnection, task: str, text: str) -> float:
    """One request; its latency in seconds (raises on anything but a 200 with one output)."""
    body = json.dumps({"inputs": [text]})
    t0 = time.perf_counter()
    conn.request("POST", f"/v1/tasks/{task}/predict", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    if response.status != 200:
        raise RuntimeError(f"{task}: HTTP {response.status}: {data[:200]!r}")
    if len(json.loads(data)["outputs"]) != 1:
        raise RuntimeError(f"{task}: not one output for one input")
    return time.perf_counter() - t0


def run_stream(port: int, stream: list[tuple[str, str]], concurrency: int, timeout: float) -> dict:
    """Send `stream` with `concurrency` closed-loop threads (one keep-alive connection each)."""
    latencies: list[float] = []
    errors: list[str] = []
    lock, nxt = threading.Lock(), iter(range(len(stream)))

    def worker() -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
        try:
            while True:
                with lock:
                    i = next(nxt, None)
                if i is None:
                    return
                try:
                    dt = post(conn, *stream[i])
                    with lock:
                        latencies.append(dt)
                except (OSError, http.client.HTTPException, RuntimeError, ValueError, KeyError) as e:
                    conn.close()  # reconnects on the next request
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * len(stream))
    return {"latencies": latencies, "errors": errors, "seconds": time.perf_counter() - t0}


def summary(parts: list[dict]) -> dict:
    """Throughput (all requests over all seconds) and latency percentiles of a server's rounds."""
    latencies = sorted(x for p in parts for x in p["latencies"])
    errors = [e for p in parts for e in p["errors"]]
    seconds = sum(p["seconds"] for p in parts)

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")

    return {"requests": len(latencies), "errors": len(errors), "first_error": errors[0] if errors else None,
            "seconds": seconds, "rps": len(latencies) / seconds, "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "round_rps": [len(p["latencies"]) / p["seconds"] for p in parts]}


class Server:
    """A server subprocess on 127.0.0.1: started, waited for, measured, stopped."""

    def __init__(self, name: str, argv: list[str], port: int, log_dir: Path):
        self.name, self.port = name, port
        self.log = log_dir / f"{name}.log"
        self._log_file = open(self.log, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        self.started = time.perf_counter()

    def wait_healthy(self, timeout: float) -> float:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://{HOST}:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - self.started
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not healthy after {timeout:.0f}s:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        self._log_file.flush()
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log_file.close()


def make_stream(suite, tasks: list[str], n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    texts = {t: suite.splits()[t]["test"].texts for t in tasks}
    return [(tasks[i % len(tasks)], rng.choice(texts[tasks[i % len(tasks)]])) for i in range(n)]


def start(name: str, argv: list[str], warmup, args, log_dir: Path) -> tuple[Server, dict]:
    """Start a server, wait until it is healthy, warm it with a round of requests, read its RSS."""
    port = int(argv[argv.index("--port") + 1])
    server = Server(name, argv, port, log_dir)
    try:
        startup = server.wait_healthy(args.startup_timeout)
        warm = run_stream(port, warmup, args.concurrency, args.timeout)
        if warm["errors"]:
            raise RuntimeError(f"{name}: warm-up failed: {warm['errors'][0]}\n{server.tail()}")
        memory = vm_status(server.proc.pid)["VmRSS"]
    except BaseException:
        server.stop()
        raise
    print(f"  {name}: healthy after {startup:.1f}s, RSS after warm-up {memory / MiB:.0f} MiB", flush=True)
    return server, {"name": name, "startup_s": startup, "rss": memory}


# --------------------------------------------------------------------------- the report


def table(results: dict, sizes: list[float], unit: int) -> str:
    single = results["single"]
    overhead = results[sizes[0]]["rss"] - sizes[0] * unit if sizes[0] == 1 else None
    lines = ["| served | RSS after warm-up | growth = RSS − overhead | 1.1 × size × one model | memory target "
             "| req/s | p50 ms | p99 ms | req/s vs single | throughput target |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in sizes:
        r = results[s]
        growth = r["rss"] - overhead if overhead is not None else None
        limit = 1.1 * s * unit
        mem = ("n/a (no 1x run)" if growth is None else ("met" if growth <= limit else "NOT met"))
        ratio = r["rps"] / single["rps"]
        lines.append(f"| flexmerge {s:g}x | {r['rss'] / MiB:.0f} MiB | "
                     f"{'–' if growth is None else f'{growth / MiB:.0f} MiB'} | {limit / MiB:.0f} MiB | {mem} | "
                     f"{r['rps']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {ratio:.2f} | "
                     f"{'met' if ratio >= 0.8 else 'NOT met'} (≥ 0.80) |")
    for key, label in (("single", "single model (base encoder)"), ("separate", "8 separate fine-tuned models")):
        if key in results:
            r = results[key]
            lines.append(f"| {label} | {r['rss'] / MiB:.0f} MiB | | | | {r['rps']:.1f} | {r['p50_ms']:.0f} | "
                         f"{r['p99_ms']:.0f} | {r['rps'] / single['rps']:.2f} | |")
    notes = [f"one model (the encoder's mergeable bytes, unit_bytes) = {unit / MiB:.1f} MiB"]
    if overhead is not None:
        notes.append(f"fixed overhead = RSS(1x) − 1 × one model = {overhead / MiB:.0f} MiB")
    return "\n".join(lines) + "\n\n" + "; ".join(notes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,2,4,8", help="comma-separated sizes (1 first: it sets the overhead)")
    ap.add_argument("--requests", type=int, default=800, help="requests in the measured stream, per server")
    ap.add_argument("--concurrency", type=int, default=8, help="client threads, each one request at a time")
    ap.add_argument("--rounds", type=int, default=8, help="the stream is sent in this many rounds per server")
    ap.add_argument("--method", default="task_arithmetic", help="merging method")
    ap.add_argument("--cache-dir", default=None, help="zoo and artifact cache [default: ~/.cache/flexmerge]")
    ap.add_argument("--seed", type=int, default=0, help="seed of the texts drawn for the stream")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    ap.add_argument("--startup-timeout", type=float, default=300.0, help="seconds for a server to become healthy")
    ap.add_argument("--no-separate", action="store_true", help="skip the 8-separate-models baseline")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--serve-plain", choices=["single", "separate"], help=argparse.SUPPRESS)  # internal
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)  # internal, with --serve-plain
    args = ap.parse_args()
    if args.serve_plain:
        serve_plain(args.serve_plain, args.port, args.cache_dir)
        return

    from flexmerge.flexmodel.read import read_manifest
    from flexmerge.suites import get_suite
    from flexmerge.suites.serving import suite_artifact

    sizes = sorted(float(x) for x in args.sizes.split(",") if x.strip())
    suite = get_suite("wordnet")
    artifacts = {}
    for s in sizes:
        t0 = time.perf_counter()
        path, zoo = suite_artifact(suite, s, args.method, args.cache_dir, log=lambda m: print(m, flush=True))
        artifacts[s] = read_manifest(path)
        print(f"{s:g}x: {path} ({time.perf_counter() - t0:.1f}s; size {artifacts[s]['size']:.3f}x, "
              f"{artifacts[s]['stored_bytes'] / MiB:.0f} MiB in blocks + {artifacts[s]['frozen_bytes'] / MiB:.0f} MiB "
              "frozen)", flush=True)
    unit = artifacts[sizes[0]]["unit_bytes"]
    tasks = zoo.tasks
    stream = make_stream(suite, tasks, args.requests, args.seed)
    warmup = make_stream(suite, tasks, 4 * len(tasks), args.seed + 1)
    cache = ["--cache-dir", args.cache_dir] if args.cache_dir else []
    plain = ["single"] + ([] if args.no_separate else ["separate"])
    ports = iter(free_ports(len(plain) + len(sizes)))
    commands = {key: [sys.executable, __file__, "--serve-plain", key, "--port", str(next(ports)), *cache]
                for key in plain}
    for s in sizes:
        commands[s] = [sys.executable, "-m", "flexmerge", "serve", "--suite", "wordnet", "--size", f"{s:g}",
                       "--method", args.method, "--host", HOST, "--port", str(next(ports)), *cache]
    results: dict = {}
    servers: dict = {}
    with tempfile.TemporaryDirectory(prefix="flexmerge-bench-serve-") as logs:
        try:
            print(f"starting {len(commands)} servers, one after the other (logs in {logs})", flush=True)
            for key, argv in commands.items():
                name = key if isinstance(key, str) else f"flexmerge-{key:g}x"
                servers[key], results[key] = start(name, argv, warmup, args, Path(logs))
            print(f"stream: {args.requests} requests per server, 1 text each, {len(tasks)} tasks round-robin, "
                  f"concurrency {args.concurrency}, {args.rounds} rounds", flush=True)
            chunks = [stream[r::args.rounds] for r in range(args.rounds)]
            parts: dict = {key: [] for key in servers}
            keys = list(servers)
            for r, chunk in enumerate(chunks):
                for key in keys[r % len(keys):] + keys[: r % len(keys)]:
                    parts[key].append(run_stream(servers[key].port, chunk, args.concurrency, args.timeout))
            for key, server in servers.items():
                after = vm_status(server.proc.pid)
                results[key].update(summary(parts[key]), rss_after=after["VmRSS"], peak_rss=after["VmHWM"])
                r = results[key]
                print(f"  {r['name']}: {r['rps']:.1f} req/s (rounds: {', '.join(f'{x:.0f}' for x in r['round_rps'])}), "
                      f"p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, {r['errors']} errors; RSS after the "
                      f"stream {after['VmRSS'] / MiB:.0f} MiB, peak {after['VmHWM'] / MiB:.0f} MiB", flush=True)
                if r["errors"]:
                    print(f"    first error: {r['first_error']}", flush=True)
        finally:
            for server in servers.values():
                server.stop()
    print()
    print(table(results, sizes, unit))
    if args.json:
        args.json.write_text(json.dumps({"unit_bytes": unit, "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": {str(k): v for k, v in results.items()},
                                         "artifacts": {f"{s:g}": {k: artifacts[s][k] for k in
                                                                  ("size", "stored_bytes", "frozen_bytes")}
                                                       for s in sizes}}, indent=1))


if __name__ == "__main__":
    main()
