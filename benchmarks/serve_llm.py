"""Serving causal LMs: mixed-task generation of a merged artifact against plain models, the
fine-tunes loaded separately and peft's multi-adapter batches, in process (the runtime's
Generator, `--mode inprocess`) or over HTTP (`flexmerge serve` and the OpenAI API driven by the
official client with streaming, `--mode http`).

    python benchmarks/serve_llm.py [--zoo DIR] [--lora-zoo DIR] [--sizes 1,2,4,8]
                                   [--baselines plain,separate,peft] [--exports 8:64]
                                   [--requests 200] [--rate 30] [--eos ignore|stop]
                                   [--mode inprocess|http|steps] [--join continuous,static]
                                   [--rounds N] [--rss] [--json OUT]

The zoo: `--zoo DIR` is a suite's zoo (its zoo.json `layout`: the base directory and one
directory per fine-tune, e.g. the wordgen suite's) or a directory holding `base/` and one
directory per fine-tune (transformers causal LMs with their tokenizers); without it a synthetic
zoo is generated once into `--cache` (8 random fine-tunes of a random LlamaForCausalLM of the
wordgen suite's shape: hidden 384, 6 layers, 6 heads / 2 KV heads, vocabulary 4096, 128
positions; each fine-tune moves every weight by noise of 2% of its scale). Each size is merged
once (task arithmetic) into `CACHE/<zoo name>/flex-<size>x` and reused; the zoo is only read.

The stream (seeded, the same for every engine): --requests requests arriving as a Poisson process
of --rate per second (open loop: arrivals do not wait for answers), tasks drawn uniformly,
max_tokens 8-64 (at most what the context leaves), greedy (temperature 0). Prompts: the zoo's
test questions (`data/<task>/test.jsonl`, chat rows, the user turn rendered by the base's chat
template) when it has them, else 8-48 random tokens. `--eos ignore` (the default in process, as
vLLM's benchmark `--ignore-eos`) decodes every request to its max_tokens: the real fine-tunes
answer in 1-4 tokens, which would leave the stream mostly prefills; `--eos stop` (the default
over HTTP, whose API has no ignore_eos) ends each at its end-of-sequence token, as served.
Measured per request: time to first token (arrival -> first token), inter-token latency (gaps
between a request's tokens), and over the run: generated tokens / seconds from the first arrival
to the last token. In process, one thread submits arrivals and steps the generator; over HTTP,
one client thread per request streams (`stream_options.include_usage` counts its tokens), and the
server's VmRSS is read after warm-up. `--rss` (in process) loads each engine alone in a fresh
subprocess, runs a warm-up stream and reads its VmRSS.

`--mode steps` times one decode step (no prefill) at each of --rows running sequences spread over
the tasks: what mixing costs per token as the batch grows.

Baselines, on the same stream and the same generation core (Generator, continuous batching,
transformers' KV cache):
  plain     one plain model (the base) for every task: what serving one model costs;
  separate  the fine-tunes loaded separately, one forward pass per model with rows each step;
  peft      peft's PeftModel over the `--lora-zoo`'s base with its LoRA adapters loaded
            (`load_adapter`), one pass per step for all rows, each through its task's adapter
            (`adapter_names`);
  --exports SIZE:RANK  the SIZEx artifact exported with `flexmerge.export_peft(rank=RANK)`
            (`flexmerge export --format peft --rank RANK`), served as `peft` is: its base read
            once per step plus a low-rank delta per task (its relative error is printed).
Targets (issue 28): the artifact's tokens/s >= 0.8 x the plain model's at every size; memory
growth <= 1.1 x size x one model, plus a fixed overhead (RSS at 1x - one model).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from _proc import HOST, MiB, free_port, rss_mib  # a sibling module: the benchmarks run as scripts
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


@dataclass(frozen=True)
class Zoo:
    """Where a zoo's models are: its base directory, one directory per task, and its chat rows
    (`data/<task>/test.jsonl`) where it has them."""

    root: Path
    base: Path
    models: dict[str, Path]

    @property
    def tasks(self) -> list[str]:
        return list(self.models)

    def test_rows(self, task: str) -> Path | None:
        path = self.root / "data" / task / "test.jsonl"
        return path if path.is_file() else None


def read_zoo(root: Path) -> Zoo:
    """A suite's zoo (zoo.json's `layout`: base and models/<task>, paths inside the zoo) or a
    directory of base/ and one directory per fine-tune."""
    index = root / "zoo.json"
    if index.is_file():
        layout = json.loads(index.read_text())["layout"]
        inside = root.resolve()

        def within(rel: str) -> Path:
            path = (root / rel).resolve()
            if not path.is_relative_to(inside):
                raise SystemExit(f"{index}: {rel!r} leaves the zoo")
            return path

        return Zoo(root, within(layout["base"]), {t: within(rel) for t, rel in layout["models"].items()})
    names = sorted(p.name for p in root.iterdir() if p.name != "base" and (p / "config.json").is_file())
    return Zoo(root, root / "base", {t: root / t for t in names})


def artifact(zoo: Zoo, size: float, cache: Path) -> Path:
    """The zoo merged to `size` (task arithmetic), built once into the cache."""
    import flexmerge

    out = cache / zoo.root.name / f"flex-{size:g}x"
    if not (out / "manifest.json").is_file():
        tasks = flexmerge.load_tasks(zoo.base, dict(zoo.models))
        flexmerge.merge_to_disk(tasks, out, size=size)
    return out


def peft_export(zoo: Zoo, size: float, rank: int, cache: Path) -> tuple[Path, dict[str, float]]:
    """The SIZEx artifact exported as a peft base and adapters truncated to `rank` (built once),
    and each task's relative error."""
    import flexmerge

    out = cache / zoo.root.name / f"flex-{size:g}x-peft-r{rank}"
    errors = out.with_name(out.name + ".errors.json")
    if not (out / "adapters").is_dir() or not errors.is_file():
        export = flexmerge.export_peft(flexmerge.load(artifact(zoo, size, cache)), out, rank=rank, overwrite=True)
        errors.write_text(json.dumps({t: r.relative_error for t, r in export.reports.items()}, indent=1))
    return out, json.loads(errors.read_text())


# ----------------------------------------------------------------------------------- the stream


@dataclass
class Request:
    arrival: float  # seconds after the start
    task: str
    prompt: list[int]
    max_tokens: int
    times: list[float] = field(default_factory=list)  # when each token (or chunk) arrived
    tokens: int = 0


def make_stream(tasks: list[str], n: int, rate: float, seed: int, prompts: "Prompts") -> list[Request]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        task = rng.choice(tasks)
        prompt = prompts.draw(task, rng)
        max_tokens = rng.randint(8, 64)
        if prompts.context is not None:
            max_tokens = max(1, min(max_tokens, prompts.context - len(prompt)))
        out.append(Request(t, task, prompt, max_tokens))
    return out


class Prompts:
    """The stream's prompts: per task, the zoo's test questions rendered by the base's chat
    template (the user turn of each chat row), or random tokens when the zoo has no data."""

    def __init__(self, zoo: Zoo):
        from flexmerge.runtime.generation import context_length, encode_chat
        from flexmerge.runtime.hf_model import load_config, load_tokenizer

        config = load_config(zoo.base, "base")
        self.vocab, self.context = config.vocab_size, context_length(config)
        self.rows: dict[str, list[list[int]]] = {}
        tokenizer = load_tokenizer(zoo.base, "base")
        for task in zoo.tasks:
            path = zoo.test_rows(task)
            if path is not None and getattr(tokenizer, "chat_template", None):
                chats = [json.loads(line)["messages"] for line in path.read_text().splitlines() if line.strip()]
                self.rows[task] = [encode_chat(tokenizer, [m for m in chat if m["role"] != "assistant"])
                                   for chat in chats]

    @property
    def source(self) -> str:
        return "the zoo's test questions" if self.rows else "random tokens"

    def draw(self, task: str, rng: random.Random) -> list[int]:
        if task in self.rows:
            return rng.choice(self.rows[task])
        return [1] + [rng.randrange(len(SPECIALS), self.vocab) for _ in range(rng.randint(8, 48))]


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


def task_decoding(directory: Path, task: str):
    """The decoding of the model in `directory` (tokenizer, stop ids, context, vocabulary)."""
    from flexmerge.runtime.generation import TaskDecoding, context_length, stop_ids
    from flexmerge.runtime.hf_model import load_config, load_tokenizer

    tok, config = load_tokenizer(directory, task), load_config(directory, task)
    return TaskDecoding(tok, stop_ids(directory, tok, config), context_length(config), config.vocab_size)


class PlainModels:
    """The server's runtime contract (what `create_app` and the OpenAI API use) over plain models
    read from the zoo: `models[task]` (one object for tasks that share one), the tasks' own
    tokenizers; no artifact is loaded."""

    def __init__(self, zoo: Zoo, kind: str):
        import transformers

        self.tasks = zoo.tasks
        if kind == "plain":
            base = transformers.AutoModelForCausalLM.from_pretrained(zoo.base).eval()
            self.models = {t: base for t in self.tasks}
        else:
            self.models = {t: transformers.AutoModelForCausalLM.from_pretrained(zoo.models[t]).eval()
                           for t in self.tasks}
        self.size = float(len({id(m) for m in self.models.values()}))
        self._decoding = {t: task_decoding(zoo.base if kind == "plain" else zoo.models[t], t) for t in self.tasks}

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


class AdapterRows:
    """Lane's row contract (`sort_key`, `set`) for peft: the adapter each row of the coming pass
    reads, as peft's `adapter_names`."""

    def __init__(self, names: list[str]):
        self.names = names
        self.current: list[str] = []

    def sort_key(self, task: int) -> int:
        return task

    def set(self, row_tasks: list[int]) -> None:
        self.current = [self.names[i] for i in row_tasks]


class MixedAdapters(torch.nn.Module):
    """A PeftModel as a Lane's model: PeftModelForCausalLM.forward takes everything but its own
    arguments as **kwargs, so Lane would not see that it takes positions, the cache and
    logits_to_keep; this names them (as the wrapped transformers model does) and adds each row's
    adapter (`adapter_names`, peft's mixed batches)."""

    def __init__(self, model: torch.nn.Module, rows: AdapterRows):
        super().__init__()
        self.model, self.rows = model, rows

    def forward(self, input_ids, attention_mask, position_ids=None, cache=None, use_cache=True, logits_to_keep=0):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                          use_cache=use_cache, logits_to_keep=logits_to_keep, adapter_names=self.rows.current)


class PeftAdapters:
    """peft's PeftModel over `base` with one LoRA adapter per task (`load_adapter`), run by the
    same Generator as the other engines: one pass per step, each row through its task's adapter."""

    def __init__(self, base: Path, adapters: dict[str, Path]):
        import transformers
        from peft import PeftModel

        self.tasks = list(adapters)
        model = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
        first, *rest = self.tasks
        model = PeftModel.from_pretrained(model, adapters[first], adapter_name=first)
        for t in rest:
            model.load_adapter(adapters[t], adapter_name=t)
        self.model = model.eval()
        self.size = 1.0
        decoding = task_decoding(base, "base")
        self._decoding = {t: decoding for t in self.tasks}

    def generator(self, *, max_batch=32, join="continuous"):
        from flexmerge.runtime.generation import Generator, Lane

        rows = AdapterRows(self.tasks)
        lane = Lane(MixedAdapters(self.model, rows), {t: i for i, t in enumerate(self.tasks)}, rows)
        return Generator([lane], self._decoding, max_batch=max_batch, join=join)


def engine_for(name: str, zoo: Zoo, lora_zoo: Zoo | None, cache: Path):
    """What serves `name`: the artifact's Runtime for `<size>x` (warmed up), `export-<size>x-r<rank>`
    (its peft export), `peft` (the LoRA zoo), else PlainModels."""
    from flexmerge.runtime import Runtime

    if name in ("plain", "separate"):
        return PlainModels(zoo, name)
    if name == "peft":
        if lora_zoo is None:
            raise SystemExit("the peft baseline needs --lora-zoo")
        return PeftAdapters(lora_zoo.base, lora_zoo.models)
    if name.startswith("export-"):
        size, rank = export_spec(name)
        out, _ = peft_export(zoo, size, rank, cache)
        return PeftAdapters(out / "base", {t: out / "adapters" / t for t in zoo.tasks})
    runtime = Runtime.load(artifact(zoo, float(name.rstrip("x")), cache))
    runtime.warm_up()
    return runtime


def export_spec(name: str) -> tuple[float, int]:
    """(size, rank) of an engine named `export-<size>x-r<rank>`."""
    size, rank = name.removeprefix("export-").split("x-r")
    return float(size), int(rank)


def without_eos(generator):
    """The generator with no end-of-sequence ids, so every request runs to its max_tokens (as
    vLLM's benchmark `--ignore-eos`): a benchmark's setting, not the server's."""
    import dataclasses

    generator.tasks = {t: dataclasses.replace(d, stops=()) for t, d in generator.tasks.items()}
    return generator


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


def decode_step_ms(engine, tasks: list[str], rows: int, prompts: Prompts, seed: int) -> float:
    """The time of one decode step of `rows` running sequences (tasks round-robin), best of 3 x 5
    steps: the pass every running row pays each token, without prefills."""
    from flexmerge.runtime.generation import Sampling

    generator = without_eos(engine.generator(max_batch=rows))
    stream = make_stream(tasks, rows, 1.0, seed, prompts)
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


def serve_baseline(kind: str, zoo: Zoo, port: int, max_batch: int, join: str) -> None:
    """A baseline behind the same server stack as `flexmerge serve` (a subprocess of this script)."""
    from flexmerge.serve.server import create_app, run_server

    runtime = PlainModels(zoo, kind)
    run_server(create_app(runtime, max_batch=max_batch, join=join, max_tokens=128), host=HOST, port=port,
               log_level="warning")






class Server:
    def __init__(self, name: str, zoo_dir: Path, artifact_dir: Path | None, max_batch: int, join: str, log: Path):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if name in ("plain", "separate"):
            cmd = [sys.executable, __file__, "--serve-baseline", name, "--zoo", str(zoo_dir), "--port", str(self.port),
                   "--max-batch", str(max_batch), "--join", join]
        else:
            cmd = [sys.executable, "-m", "flexmerge", "serve", str(artifact_dir),
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


# ------------------------------------------------------------------------------------ memory


def warm_rss(name: str, zoo: Zoo, lora_zoo: Zoo | None, cache: Path, prompts: Prompts, max_batch: int,
             seed: int) -> float:
    """VmRSS (MiB) of this process with `name` loaded alone, after a warm-up stream of max_batch
    requests at once (run in a fresh subprocess: `--rss-of`)."""
    engine = engine_for(name, zoo, lora_zoo, cache)
    stream = make_stream(zoo.tasks, max_batch, 1e6, seed + 10**6, prompts)
    run_inprocess(without_eos(engine.generator(max_batch=max_batch)), stream)
    return rss_mib(os.getpid())


def rss_in_subprocess(name: str, argv: list[str]) -> float:
    out = subprocess.run([sys.executable, __file__, *argv, "--rss-of", name], check=True, capture_output=True,
                         text=True)
    return float(out.stdout.strip().splitlines()[-1])


def one_model_mib(zoo: Zoo) -> float:
    """One model's weights (the base's tensors), MiB."""
    from safetensors.torch import load_file

    return sum(t.numel() * t.element_size() for f in zoo.base.glob("*.safetensors")
               for t in load_file(f).values()) / MiB


# -------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", type=Path, help="a suite's zoo (zoo.json) or DIR with base/ and one directory per "
                    "fine-tune (default: synthetic)")
    ap.add_argument("--lora-zoo", type=Path, help="a zoo of LoRA adapters of one base, for the peft baseline")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "flexmerge" / "serve_llm",
                    help="where the synthetic zoo, the artifacts and the exports go")
    ap.add_argument("--tasks", type=int, default=8, help="fine-tunes of the synthetic zoo")
    ap.add_argument("--sizes", default="1,2,4,8")
    ap.add_argument("--baselines", default="plain,separate", help="comma-separated: plain, separate, peft")
    ap.add_argument("--exports", default="", help="comma-separated SIZE:RANK: the SIZEx artifact's peft export at "
                    "rank RANK, served by peft")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rate", type=float, default=30.0, help="requests per second (Poisson arrivals)")
    ap.add_argument("--eos", choices=["ignore", "stop"],
                    help="ignore (the default in process): every request runs to its max_tokens; stop (the "
                    "default, and the only choice, over HTTP): as served")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--join", default="continuous", help="comma-separated: continuous, static")
    ap.add_argument("--mode", default="inprocess", choices=["inprocess", "http", "steps"],
                    help="steps: the time of one decode step at each of --rows running sequences")
    ap.add_argument("--rows", default="8,32,128,256", help="with --mode steps: batch sizes")
    ap.add_argument("--rounds", type=int, default=1, help="streams per engine, the engines visited in rotated order")
    ap.add_argument("--rss", action="store_true", help="in process: each engine's VmRSS, loaded alone in a subprocess")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--serve-baseline", help=argparse.SUPPRESS)
    ap.add_argument("--rss-of", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    zoo = read_zoo(args.zoo or synthetic_zoo(args.cache / f"synthetic-{args.tasks}", args.tasks))
    lora_zoo = read_zoo(args.lora_zoo) if args.lora_zoo else None
    if args.serve_baseline:
        serve_baseline(args.serve_baseline, zoo, args.port, args.max_batch, args.join)
        return
    tasks = zoo.tasks
    prompts = Prompts(zoo)
    args.eos = args.eos or ("stop" if args.mode == "http" else "ignore")
    if args.rss_of:
        print(warm_rss(args.rss_of, zoo, lora_zoo, args.cache, prompts, args.max_batch, args.seed))
        return
    names = [f"{float(s):g}x" for s in args.sizes.split(",") if s] + [b for b in args.baselines.split(",") if b]
    for spec in filter(None, args.exports.split(",")):
        size, rank = spec.split(":")
        names.append(f"export-{float(size):g}x-r{int(rank)}")
        _, errors = peft_export(zoo, float(size), int(rank), args.cache)
        print(f"export {size}x rank {rank}: relative error mean {sum(errors.values()) / len(errors):.3g}, "
              f"max {max(errors.values()):.3g}", flush=True)
    print(f"zoo {zoo.root} ({len(tasks)} tasks), prompts: {prompts.source}, eos: {args.eos}", flush=True)
    if args.mode == "steps":
        table = {}
        for name in names:
            engine = engine_for(name, zoo, lora_zoo, args.cache)
            table[name] = {int(b): round(decode_step_ms(engine, tasks, int(b), prompts, args.seed), 1)
                           for b in args.rows.split(",")}
            print(f"{name:>16} decode step ms by rows: {table[name]}", flush=True)
        if args.json:
            args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "step_ms": table},
                                            indent=1))
        return
    if args.mode == "http" and args.eos == "ignore":
        raise SystemExit("--eos ignore is in process only (the OpenAI API has no ignore_eos): pass --eos stop")
    rss: dict[str, float] = {}
    if args.rss and args.mode == "inprocess":
        for name in names:
            rss[name] = round(rss_in_subprocess(name, sys.argv[1:]), 1)
            print(f"{name:>16} RSS after warm-up, alone: {rss[name]} MiB", flush=True)
        print(f"one model: {one_model_mib(zoo):.1f} MiB", flush=True)
    runs = [(name, join) for join in args.join.split(",") for name in names]
    parts: dict[str, list[dict]] = {f"{n} {j}": [] for n, j in runs}
    servers: dict[tuple[str, str], object] = {}
    try:
        for name, join in runs:  # every engine or server up, warmed, before any measurement
            if args.mode == "inprocess":
                servers[name, join] = servers.get((name, "")) or engine_for(name, zoo, lora_zoo, args.cache)
                servers[name, ""] = servers[name, join]
            else:
                if name in ("peft",) or name.startswith("export-"):
                    raise SystemExit(f"{name} is measured in process only")
                art = None if name in ("plain", "separate") else artifact(zoo, float(name.rstrip("x")), args.cache)
                server = Server(name, zoo.root, art, args.max_batch, join, args.cache / f"server-{name}-{join}.log")
                servers[name, join] = server
                server.wait()
                run_http(server.url, make_stream(tasks, 8, 100.0, args.seed + 10**6, prompts))  # warm-up
                server.rss = rss_mib(server.proc.pid)
        for round_ in range(args.rounds):  # rounds visit the engines in rotated order: load changes hit all alike
            shift = round_ % len(runs)
            for name, join in runs[shift:] + runs[:shift]:
                stream = make_stream(tasks, args.requests, args.rate, args.seed + round_, prompts)
                if args.mode == "inprocess":
                    generator = servers[name, join].generator(max_batch=args.max_batch, join=join)
                    part = run_inprocess(without_eos(generator) if args.eos == "ignore" else generator, stream)
                    if name in rss:
                        part["rss_mib"] = rss[name]
                else:
                    part = {**run_http(servers[name, join].url, stream), "rss_mib": round(servers[name, join].rss, 1)}
                parts[f"{name} {join}"].append(part)
                brief = summarize([part])
                print(f"round {round_ + 1} {name:>16} {join:<10} " + " ".join(f"{k}={v}" for k, v in brief.items()),
                      flush=True)
    finally:
        for server in servers.values():
            if isinstance(server, Server):
                server.stop()
    results = {key: summarize(p) for key, p in parts.items()}
    print("\nall rounds:")
    for key, result in results.items():
        print(f"{key:>27} " + " ".join(f"{k}={v}" for k, v in result.items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=1))


if __name__ == "__main__":
    main()
