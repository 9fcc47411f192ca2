"""Serving causal LMs: mixed-task generation of a merged artifact against plain models, in process
(the runtime's Generator, `--mode inprocess`) or over HTTP (`flexmerge serve` and the OpenAI API
driven by the official client with streaming, `--mode http`).

    python benchmarks/serve_llm.py [--zoo DIR] [--sizes 1,2,4,8] [--requests 200] [--rate 30]
                                   [--mode inprocess|http|steps] [--join continuous,static] [--rounds N]
                                   [--json OUT]

The zoo: `--zoo DIR` holds `DIR/base` and one directory per fine-tune (transformers causal LMs with
their tokenizers, e.g. the wordgen suite's); without it a synthetic zoo is generated once into
`--cache` (8 random fine-tunes of a random LlamaForCausalLM of the wordgen suite's shape: hidden
384, 6 layers, 6 heads / 2 KV heads, vocabulary 4096, 128 positions; each fine-tune moves every
weight by noise of 2% of its scale). Each size is merged once (task arithmetic) into
`ZOO/flex-<size>x` and reused.

The stream (seeded, the same for every server): --requests requests arriving as a Poisson process
of --rate per second (open loop: arrivals do not wait for answers), tasks drawn uniformly, prompts
of 8-48 random tokens, max_tokens 8-64, greedy (temperature 0). Measured per request: time to first
token (arrival -> first token), inter-token latency (gaps between a request's tokens), and over the
run: generated tokens / seconds from the first arrival to the last token. In process, one thread
submits arrivals and steps the generator; over HTTP, one client thread per request streams
(`stream_options.include_usage` counts its tokens), and the server's VmRSS is read after warm-up.

`--mode steps` times one decode step (no prefill) at each of --rows running sequences spread over
the tasks: what mixing costs per token as the batch grows.

Baselines, on the same stream and the same generation core:
  plain     one plain model (the base) for every task: what serving one model costs;
  separate  the fine-tunes loaded separately, one forward pass per model with rows each step.
Targets (issue 28): the artifact's tokens/s >= 0.8 x the plain model's at every size; memory
growth <= 1.1 x size x one model, plus a fixed overhead (RSS at 1x - one model).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

MiB = 1 << 20
HOST = "127.0.0.1"
SHAPE = dict(vocab_size=4096, hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=128)
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


# ------------------------------------------------------------------------------------- the zoo


def synthetic_zoo(root: Path, tasks: int, seed: int = 0) -> Path:
    """A random Llama base and `tasks` fine-tunes of it (noise of 2% of each tensor's scale), each
    saved with a word-level tokenizer; reused when present."""
    import tokenizers
    import transformers
    from tokenizers import decoders, models, pre_tokenizers, processors

    names = [f"t{i}" for i in range(tasks)]
    if all((root / n / "config.json").is_file() for n in ["base", *names]):
        return root
    words = SPECIALS + [f"w{i}" for i in range(SHAPE["vocab_size"] - len(SPECIALS))]
    tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                     unk_token="<unk>", pad_token="<pad>", chat_template=CHAT_TEMPLATE)
    config = transformers.LlamaConfig(**SHAPE, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    base = transformers.LlamaForCausalLM(config).eval()
    for name in ["base", *names]:
        model = base
        if name != "base":
            torch.manual_seed(seed + 1 + names.index(name))
            model = transformers.LlamaForCausalLM(config).eval()
            model.load_state_dict({k: v + 0.02 * v.std() * torch.randn_like(v) for k, v in base.state_dict().items()})
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def zoo_tasks(zoo: Path) -> list[str]:
    return sorted(p.name for p in zoo.iterdir() if p.name != "base" and (p / "config.json").is_file())


def artifact(zoo: Path, size: float) -> Path:
    """The zoo merged to `size` (task arithmetic), built once."""
    import flexmerge

    out = zoo / f"flex-{size:g}x"
    if not (out / "manifest.json").is_file():
        tasks = flexmerge.load_tasks(zoo / "base", {t: zoo / t for t in zoo_tasks(zoo)})
        flexmerge.merge_to_disk(tasks, out, size=size)
    return out


# ----------------------------------------------------------------------------------- the stream


@dataclass
class Request:
    arrival: float  # seconds after the start
    task: str
    prompt: list[int]
    max_tokens: int
    times: list[float] = field(default_factory=list)  # when each token (or chunk) arrived
    tokens: int = 0


def make_stream(tasks: list[str], n: int, rate: float, vocab: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        prompt = [1] + [rng.randrange(len(SPECIALS), vocab) for _ in range(rng.randint(8, 48))]
        out.append(Request(t, rng.choice(tasks), prompt, rng.randint(8, 64)))
    return out


def measure(stream: list[Request], start: float) -> dict:
    """One run's raw figures: tokens, seconds (first arrival to last token), TTFT and gaps (ms)."""
    end = max((r.times[-1] for r in stream if r.times), default=start)
    return {"tokens": sum(r.tokens for r in stream), "seconds": end - start,
            "ttft": [(r.times[0] - start - r.arrival) * 1e3 for r in stream if r.times],
            "gaps": [(b - a) * 1e3 for r in stream for a, b in zip(r.times, r.times[1:])],
            "answered": sum(bool(r.times) for r in stream), "requests": len(stream)}


def summarize(runs: list[dict]) -> dict:
    """Tokens/s over all runs (their tokens over their seconds), TTFT and inter-token latency
    percentiles (ms) over all their samples."""
    tokens, seconds = sum(r["tokens"] for r in runs), sum(r["seconds"] for r in runs)
    ttft = [x for r in runs for x in r["ttft"]]
    gaps = [x for r in runs for x in r["gaps"]]
    out = {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
           "ttft_p50_ms": round(_pct(ttft, 50), 1), "ttft_p99_ms": round(_pct(ttft, 99), 1),
           "itl_p50_ms": round(_pct(gaps, 50), 2), "itl_p99_ms": round(_pct(gaps, 99), 2),
           "answered": sum(r["answered"] for r in runs), "requests": sum(r["requests"] for r in runs)}
    for key in ("passes", "rss_mib"):
        if key in runs[0]:
            out[key] = runs[0][key] if key == "rss_mib" else sum(r[key] for r in runs)
    return out


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


# -------------------------------------------------------------------------------- plain models


class PlainModels:
    """The server's runtime contract (what `create_app` and the OpenAI API use) over plain models
    read from the zoo: `models[task]` (one object for tasks that share one), the tasks' own
    tokenizers; no artifact is loaded."""

    def __init__(self, zoo: Path, kind: str):
        import transformers

        from flexmerge.runtime.generation import TaskDecoding, context_length, stop_ids
        from flexmerge.runtime.hf_model import load_config, load_tokenizer

        self.tasks = zoo_tasks(zoo)
        if kind == "plain":
            base = transformers.AutoModelForCausalLM.from_pretrained(zoo / "base").eval()
            self.models = {t: base for t in self.tasks}
        else:
            self.models = {t: transformers.AutoModelForCausalLM.from_pretrained(zoo / t).eval() for t in self.tasks}
        self.size = float(len({id(m) for m in self.models.values()}))
        self._decoding = {}
        for t in self.tasks:
            tok, config = load_tokenizer(zoo / t, t), load_config(zoo / t, t)
            self._decoding[t] = TaskDecoding(tok, stop_ids(zoo / t, tok, config), context_length(config),
                                             config.vocab_size)

    def task_info(self, task):
        return {"task": task, "kind": "text-generation", "labels": None}

    def predict_mixed(self, items):
        raise NotImplementedError("plain causal LMs generate only")

    def decoding(self, task):
        return self._decoding[task]

    def encode_prompt(self, task, text):
        from flexmerge.runtime.generation import encode_prompt

        return encode_prompt(self._decoding[task].tokenizer, text)

    def encode_chat(self, task, messages):
        from flexmerge.runtime.generation import encode_chat

        return encode_chat(self._decoding[task].tokenizer, messages)

    def generator(self, *, max_batch=32, join="continuous"):
        from flexmerge.runtime.generation import Generator, Lane

        lanes: dict[int, Lane] = {}
        for t, m in self.models.items():
            lanes.setdefault(id(m), Lane(m, {}))
            lanes[id(m)].tasks[t] = 0
        return Generator(list(lanes.values()), self._decoding, max_batch=max_batch, join=join)


def engine_for(name: str, zoo: Path):
    """What serves `name`: the artifact's Runtime for `<size>x` (warmed up), else PlainModels."""
    from flexmerge.runtime import Runtime

    if name in ("plain", "separate"):
        return PlainModels(zoo, name)
    runtime = Runtime.load(artifact(zoo, float(name.rstrip("x"))))
    runtime.warm_up()
    return runtime


# ----------------------------------------------------------------------------------- in process


def run_inprocess(generator, stream: list[Request]) -> dict:
    """One thread: submit the requests whose arrival time has come, step, record each token's time."""
    from flexmerge.runtime.generation import Sampling

    pending = sorted(stream, key=lambda r: r.arrival)
    owner = {}
    start = time.perf_counter()
    i = 0
    while i < len(pending) or generator.busy:
        now = time.perf_counter() - start
        while i < len(pending) and pending[i].arrival <= now:
            r = pending[i]
            owner[generator.submit(r.task, r.prompt, Sampling(max_tokens=r.max_tokens, temperature=0)).id] = r
            i += 1
        if not generator.busy:
            time.sleep(max(0.0, pending[i].arrival - (time.perf_counter() - start)))
            continue
        updates = generator.step()
        stamp = time.perf_counter()
        for u in updates:
            r = owner[u.generation.id]
            r.times.append(stamp)
            r.tokens = u.tokens
    return {**measure(stream, start), "passes": generator.passes}


def decode_step_ms(engine, tasks: list[str], rows: int, vocab: int, seed: int) -> float:
    """The time of one decode step of `rows` running sequences (tasks round-robin), best of 3 x 5
    steps: the pass every running row pays each token, without prefills."""
    from flexmerge.runtime.generation import Sampling

    generator = engine.generator(max_batch=rows)
    stream = make_stream(tasks, rows, 1.0, vocab, seed)
    for i, r in enumerate(stream):
        generator.submit(tasks[i % len(tasks)], r.prompt[:32], Sampling(max_tokens=64, temperature=0))
    generator.step()  # every row's prefill
    generator.step()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(5):
            generator.step()
        best = min(best, (time.perf_counter() - start) / 5)
    return best * 1e3


# ------------------------------------------------------------------------------------ over HTTP


def serve_baseline(kind: str, zoo: Path, port: int, max_batch: int, join: str) -> None:
    """A baseline behind the same server stack as `flexmerge serve` (a subprocess of this script)."""
    from flexmerge.serve.server import create_app, run_server

    runtime = PlainModels(zoo, kind)
    run_server(create_app(runtime, max_batch=max_batch, join=join, max_tokens=128), host=HOST, port=port,
               log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    def __init__(self, name: str, zoo: Path, max_batch: int, join: str, log: Path):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if name in ("plain", "separate"):
            cmd = [sys.executable, __file__, "--serve-baseline", name, "--zoo", str(zoo), "--port", str(self.port),
                   "--max-batch", str(max_batch), "--join", join]
        else:
            cmd = [sys.executable, "-m", "flexmerge", "serve", str(artifact(zoo, float(name.rstrip("x")))),
                   "--port", str(self.port), "--max-batch", str(max_batch), "--max-tokens", "128"]
        self.proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
        self.log = log
        self.rss = float("nan")  # MiB once warmed up

    def wait(self, limit_s: float = 300) -> None:
        import urllib.request

        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("server not up in time")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def run_http(url: str, stream: list[Request]) -> dict:
    """One client thread per request, started at its arrival time, streaming its completion."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    start = time.perf_counter()

    def one(r: Request) -> None:
        time.sleep(max(0.0, r.arrival - (time.perf_counter() - start)))
        chunks = client.completions.create(model=r.task, prompt=r.prompt, max_tokens=r.max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True})
        for chunk in chunks:
            if chunk.choices:
                r.times.append(time.perf_counter())
            if chunk.usage is not None:
                r.tokens = chunk.usage.completion_tokens

    threads = [threading.Thread(target=one, args=(r,)) for r in stream]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return measure(stream, start)


# -------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", type=Path, help="DIR with base/ and one directory per fine-tune (default: synthetic)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "flexmerge" / "serve_llm",
                    help="where the synthetic zoo and its artifacts go")
    ap.add_argument("--tasks", type=int, default=8, help="fine-tunes of the synthetic zoo")
    ap.add_argument("--sizes", default="1,2,4,8")
    ap.add_argument("--baselines", default="plain,separate")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rate", type=float, default=30.0, help="requests per second (Poisson arrivals)")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--join", default="continuous", help="comma-separated: continuous, static")
    ap.add_argument("--mode", default="inprocess", choices=["inprocess", "http", "steps"],
                    help="steps: the time of one decode step at each of --rows running sequences")
    ap.add_argument("--rows", default="8,32,128,256", help="with --mode steps: batch sizes")
    ap.add_argument("--rounds", type=int, default=1, help="streams per engine, the engines visited in rotated order")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--serve-baseline", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    zoo = args.zoo or synthetic_zoo(args.cache / f"synthetic-{args.tasks}", args.tasks)
    if args.serve_baseline:
        serve_baseline(args.serve_baseline, zoo, args.port, args.max_batch, args.join)
        return
    tasks = zoo_tasks(zoo)
    vocab = json.loads((zoo / "base" / "config.json").read_text())["vocab_size"]
    names = [f"{float(s):g}x" for s in args.sizes.split(",") if s] + [b for b in args.baselines.split(",") if b]
    if args.mode == "steps":
        table = {}
        for name in names:
            engine = engine_for(name, zoo)
            table[name] = {int(b): round(decode_step_ms(engine, tasks, int(b), vocab, args.seed), 1)
                           for b in args.rows.split(",")}
            print(f"{name:>9} decode step ms by rows: {table[name]}", flush=True)
        if args.json:
            args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "step_ms": table},
                                            indent=1))
        return
    runs = [(name, join) for join in args.join.split(",") for name in names]
    parts: dict[str, list[dict]] = {f"{n} {j}": [] for n, j in runs}
    servers: dict[tuple[str, str], object] = {}
    try:
        for name, join in runs:  # every engine or server up, warmed, before any measurement
            if args.mode == "inprocess":
                servers[name, join] = servers.get((name, "")) or engine_for(name, zoo)
                servers[name, ""] = servers[name, join]
            else:
                server = Server(name, zoo, args.max_batch, join, args.cache / f"server-{name}-{join}.log")
                servers[name, join] = server
                server.wait()
                run_http(server.url, make_stream(tasks, 8, 100.0, vocab, args.seed + 10**6))  # warm-up
                server.rss = rss_mib(server.proc.pid)
        for round_ in range(args.rounds):  # rounds visit the engines in rotated order: load changes hit all alike
            shift = round_ % len(runs)
            for name, join in runs[shift:] + runs[:shift]:
                stream = make_stream(tasks, args.requests, args.rate, vocab, args.seed + round_)
                if args.mode == "inprocess":
                    part = run_inprocess(servers[name, join].generator(max_batch=args.max_batch, join=join), stream)
                else:
                    part = {**run_http(servers[name, join].url, stream), "rss_mib": round(servers[name, join].rss, 1)}
                parts[f"{name} {join}"].append(part)
                brief = summarize([part])
                print(f"round {round_ + 1} {name:>9} {join:<10} " + " ".join(f"{k}={v}" for k, v in brief.items()),
                      flush=True)
    finally:
        for server in servers.values():
            if isinstance(server, Server):
                server.stop()
    results = {key: summarize(p) for key, p in parts.items()}
    print("\nall rounds:")
    for key, result in results.items():
        print(f"{key:>20} " + " ".join(f"{k}={v}" for k, v in result.items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=1))


if __name__ == "__main__":
    main()
