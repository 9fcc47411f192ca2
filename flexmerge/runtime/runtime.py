"""One process that answers every task of one artifact: per-task modules that share the stored tensors,
and mixed-task batches that run as one forward pass.

Memory: the artifact is loaded once; `module(task)` loads the task's weights with `assign=True`, so
a block stored once (one group shared by several tasks) is one tensor in memory however many tasks
read it. Exceptions, by what is stored: a masked group (EMR, Consensus) is rebuilt per task
(θ0 + mask ⊙ τ), so is a residual group (Twin-Merging: θ0 + shared + A·B), and a tensor split into
row groups (`split:K`) is concatenated per task. Inputs of unknown task are routed by a router
stored in the artifact (`route`, `predict_routed`; see `flexmerge.routing`).

Mixed batches: one mixed copy of the model (`flexmerge.runtime.batching`) runs a batch of any
tasks as one forward pass; a model that cannot be mixed falls back to one forward pass per task.

Causal LMs (`*ForCausalLM`) are text-generation tasks: `generate` and `generator` decode
sequences of any tasks together, one forward pass per step with a KV cache, on the same mixed
copy (`flexmerge.runtime.generation`); `predict` refuses them.

External heads: an encoder artifact (a merged `BertModel`, say) whose tasks each have a head of
their own outside the artifact (`heads=`, e.g. a Linear trained on mean-pooled features) is served
as text-classification: the encoder runs (one pass for a mixed batch), its last hidden state is
mean-pooled over non-padding tokens, and each task's head runs on the rows of that task.
`flexmerge.suites.serving.suite_runtime("wordnet", size=2)` serves a suite's zoo that way.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from flexmerge.errors import ConfigError, FlexMergeError
from flexmerge.flexmodel import FlexModel, load
from flexmerge.routing import fit_router, route_weights
from flexmerge.runtime.batching import BatchRows, mixed_copy
from flexmerge.runtime.generation import (
    Generation,
    Generator,
    Lane,
    Sampling,
    TaskDecoding,
    context_length,
    encode_chat,
    encode_prompt,
    is_causal_lm,
    stop_ids,
)
from flexmerge.runtime.hf_dir import unpack_hf_files
from flexmerge.runtime.hf_model import build_model, load_config, load_tokenizer
from flexmerge.runtime.memory import release_freed_memory
from flexmerge.runtime.pooling import mean_pool


class Runtime:
    """Serve every task of one artifact from one process (see the module docstring)."""

    def __init__(self, flex: FlexModel, heads: dict[str, torch.nn.Module] | None = None,
                 labels: dict[str, list[str]] | None = None, hf_dir: str | Path | None = None,
                 max_length: int | None = None):
        """`heads`: per task, a module applied to the mean-pooled last hidden state of the task's
        encoder (the task is then text-classification, with `labels[task]` as its label names,
        default LABEL_0...). `hf_dir`: the config.json and tokenizer for tasks whose artifact holds
        no Hugging Face files (inputs given as plain safetensors). `max_length`: tokens kept per
        input (default: the tokenizer's maximum, capped at the model's positions)."""
        self.flex = flex
        self.heads = {t: h.eval() for t, h in (heads or {}).items()}
        self.labels = {t: list(names) for t, names in (labels or {}).items()}
        self.hf_dir = Path(hf_dir) if hf_dir is not None else None
        self.max_length = max_length
        for task in sorted({*self.heads, *self.labels}):
            self._check(task)
            width, names = getattr(self.heads.get(task), "out_features", None), self.labels.get(task)
            if task not in self.heads:
                raise ConfigError(f"labels given for task {task!r}, which has no head")
            if names is None and width is None:
                raise ConfigError(f"task {task!r}: its head has no out_features; pass its label names (labels=)")
            if names is not None and width is not None and len(names) != width:
                raise ConfigError(f"task {task!r}: {len(names)} label names for a head of {width} outputs")
        self._lock = threading.Lock()
        self._modules: dict[str, torch.nn.Module] = {}
        self._tokenizers: dict[str, Any] = {}
        self._max_tokens_of: dict[str, int | None] = {}
        self._dirs: dict[str, Path] = {}
        self._mixed: tuple[torch.nn.Module, BatchRows] | None = None
        self._mixed_tried = False
        self._shared_tokenizer: bool | None = None
        self._decoding: dict[str, TaskDecoding] = {}
        self._shared: torch.nn.Module | None = None  # the router's feature model (shared weights)
        self._info: dict[str, dict[str, Any]] = {}
        self._scratch: tempfile.TemporaryDirectory | None = None

    @classmethod
    def load(cls, path: str | Path, **options: Any) -> "Runtime":
        """The artifact at `path`; `options` as for Runtime (heads, labels, hf_dir, max_length)."""
        return cls(load(path), **options)

    @property
    def tasks(self) -> list[str]:
        return list(self.flex.tasks)

    @property
    def size(self) -> float:
        return float(self.flex.size)

    def task_info(self, task: str) -> dict[str, Any]:
        """{"task", "kind": text-classification | feature-extraction | text-generation, "labels"}
        from the task's head (text-classification) or else its config (text-generation: a causal LM)."""
        if task not in self._info and task in self.heads:
            labels = self.labels.get(task) or [f"LABEL_{i}" for i in range(self.heads[task].out_features)]
            self._info[task] = {"task": task, "kind": "text-classification", "labels": labels}
        if task not in self._info:
            config = self._config(task)
            kind = _kind(config)
            labels = [config.id2label[i] for i in range(config.num_labels)] if kind == "text-classification" else None
            self._info[task] = {"task": task, "kind": kind, "labels": labels}
        return dict(self._info[task])

    def module(self, task: str, model: torch.nn.Module | None = None) -> torch.nn.Module:
        """The task's module, its weights the artifact's stored tensors (not copies). For Hugging
        Face artifacts it is built from the task's own config; otherwise pass an empty `model`."""
        self._check(task)
        with self._lock:
            if task not in self._modules:
                if model is None:
                    model = self._hf_model(task)
                model.load_state_dict(self.flex.state_dict(task), strict=True, assign=True)
                self._modules[task] = model.eval()
            return self._modules[task]

    def predict(self, task: str, inputs: Sequence[str]) -> list[dict[str, Any]]:
        """Predictions of one task for a list of texts (labels + scores, or embeddings)."""
        return self.predict_mixed([(task, x) for x in inputs])

    def predict_mixed(self, items: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
        """Predictions for (task, text) pairs of any tasks, in input order, as ONE forward pass
        when the model allows it (else one pass per task)."""
        if not items:
            return []
        for task in dict.fromkeys(t for t, _ in items):
            self._check(task)
            if self.task_info(task)["kind"] == "text-generation":
                raise ConfigError(f"task {task!r} is a causal LM: it generates text (Runtime.generate, or the "
                                  f"server's POST /v1/completions with model {task!r}), it does not predict labels")
        texts = [x for _, x in items]
        tasks = [t for t, _ in items]
        mixed = self._mixed_model() if self._one_tokenizer() else None
        if mixed is None:
            return self._per_task(tasks, texts)
        model, rows = mixed
        index = {t: i for i, t in enumerate(self.flex.tasks)}
        order = sorted(range(len(items)), key=lambda i: rows.sort_key(index[tasks[i]]))  # stable
        tasks, texts = [tasks[i] for i in order], [texts[i] for i in order]
        enc = self._encode(tasks[0], texts)
        with self._lock, torch.inference_mode():
            rows.set([index[t] for t in tasks])
            sorted_results = self._results(tasks, model(**enc), enc["attention_mask"])
        results: list[dict[str, Any]] = [{}] * len(items)
        for i, result in zip(order, sorted_results):
            results[i] = result
        return results

    def _per_task(self, tasks: list[str], texts: list[str]) -> list[dict[str, Any]]:
        results: list[dict[str, Any] | None] = [None] * len(texts)
        for task in dict.fromkeys(tasks):
            rows = [i for i, t in enumerate(tasks) if t == task]
            enc = self._encode(task, [texts[i] for i in rows])
            with torch.inference_mode():
                outputs = self._results([task] * len(rows), self.module(task)(**enc), enc["attention_mask"])
            for i, out in zip(rows, outputs):
                results[i] = out
        return results  # type: ignore[return-value]

    def _results(self, tasks: list[str], output: Any, attention_mask: torch.Tensor) -> list[dict[str, Any]]:
        """Each row's answer; tasks with an external head: the head on their rows' pooled features."""
        logits: dict[int, torch.Tensor] = {}
        if any(t in self.heads for t in tasks):
            features = mean_pool(output.last_hidden_state, attention_mask)
            for task in dict.fromkeys(t for t in tasks if t in self.heads):
                rows = [i for i, t in enumerate(tasks) if t == task]
                logits.update(zip(rows, self.heads[task](features[rows])))
        return [self._result(t, output, row, attention_mask, logits.get(row)) for row, t in enumerate(tasks)]

    def _result(self, task: str, output: Any, row: int, attention_mask: torch.Tensor,
                logits: torch.Tensor | None = None) -> dict[str, Any]:
        info = self.task_info(task)
        if info["kind"] == "text-classification":
            if logits is None:
                logits = output.logits[row, : len(info["labels"])]
            probs = torch.softmax(logits.float(), -1)
            best = int(probs.argmax())
            return {"label": info["labels"][best], "score": float(probs[best]),
                    "scores": {label: float(p) for label, p in zip(info["labels"], probs)}}
        return {"embedding": mean_pool(output.last_hidden_state[row], attention_mask[row]).tolist()}

    # text generation (causal LMs) ----------------------------------------------------------------

    @property
    def generation_tasks(self) -> list[str]:
        """The tasks that are causal LMs (kind text-generation)."""
        return [t for t in self.flex.tasks if self.task_info(t)["kind"] == "text-generation"]

    def encode_prompt(self, task: str, text: str) -> list[int]:
        """A completion prompt as the task's token ids (with the special tokens its tokenizer adds)."""
        self._check(task)
        return encode_prompt(self._tokenizer(task), text)

    def encode_chat(self, task: str, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Chat messages rendered by the task's chat template, as token ids; a task without a
        template, or messages it refuses, is a ConfigError."""
        self._check(task)
        try:
            return encode_chat(self._tokenizer(task), messages)
        except ConfigError as e:
            raise ConfigError(f"task {task!r}: {e}") from None

    def decoding(self, task: str) -> TaskDecoding:
        """The task's tokenizer, end-of-sequence ids, context length and vocabulary size, read once."""
        self._check(task)
        if task not in self._decoding:
            tokenizer, config = self._tokenizer(task), self._config(task)
            vocab = getattr(config, "vocab_size", None)
            self._decoding[task] = TaskDecoding(tokenizer, stop_ids(self._hf_dir(task), tokenizer, config),
                                                context_length(config), vocab if isinstance(vocab, int) else None)
        return self._decoding[task]

    def generator(self, *, max_batch: int = 32, join: str = "continuous") -> Generator:
        """A Generator over every text-generation task: sequences of any tasks decode together on
        the mixed copy of the model (one pass per step), or per task where it cannot be mixed.
        `join`: "continuous" (sequences join and leave between steps) or "static"."""
        tasks = self.generation_tasks
        if not tasks:
            raise ConfigError(f"this model has no text-generation task (causal LM); its tasks: {', '.join(self.tasks)}")
        mixed = self._mixed_model()
        if mixed is not None:
            index = {t: i for i, t in enumerate(self.flex.tasks)}
            lanes = [Lane(mixed[0], {t: index[t] for t in tasks}, mixed[1])]
        else:
            lanes = [Lane(self.module(t), {t: 0}) for t in tasks]
        return Generator(lanes, {t: self.decoding(t) for t in tasks}, max_batch=max_batch, join=join, lock=self._lock)

    def generate(self, prompts: Sequence[tuple[str, str | Sequence[int]]], sampling: Sampling | None = None, *,
                 max_batch: int = 32) -> list[Generation]:
        """Completions of (task, prompt) pairs of any tasks, decoded together; a prompt is text or
        token ids. `sampling`: as for the OpenAI API (default: temperature 1, 16 tokens; pass
        Sampling(temperature=0) for greedy). Each result has `text`, `tokens`, `finish_reason`."""
        sampling = sampling or Sampling()
        generator = self.generator(max_batch=max_batch)
        runs = [generator.submit(task, self.encode_prompt(task, p) if isinstance(p, str) else list(p), sampling)
                for task, p in prompts]
        generator.run()
        return runs

    def warm_up(self) -> None:
        """Build every task's model now and run one input through each (a server does this before
        it listens): text-generation tasks generate two tokens, the others predict."""
        generating = set(self.generation_tasks)
        others = [t for t in self.tasks if t not in generating]
        if others:
            self.predict_mixed([(t, "warm up") for t in others])
        if generating:
            self.generate([(t, "warm up") for t in generating], Sampling(max_tokens=2, temperature=0.0))

    # routed inference (inputs of unknown task) ---------------------------------------------------

    def features(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, H): the shared model's last hidden state mean-pooled over each input's tokens, the
        router's features (Twin-Merging pools the shared expert's last hidden state)."""
        task = self.flex.tasks[0]
        with self._lock:
            if self._shared is None:
                model = self._hf_model(task)
                model.load_state_dict(self.flex.shared_state_dict(), strict=True, assign=True)
                self._shared = model.eval()
        enc = self._encode(task, list(texts))
        with torch.inference_mode():
            out = self._shared(**enc, output_hidden_states=True)
        return mean_pool(out.hidden_states[-1], enc["attention_mask"]).float()

    def train_router(self, calibration: Sequence[tuple[str, str]], **options: Any):
        """Fit the router on (text, task) calibration pairs (`fit_router` options) and keep it on the model."""
        if not calibration:
            raise ConfigError("no calibration data: routing needs (input, task) examples of every task")
        for _, task in calibration:
            self._check(task)
        x = torch.cat([self.features([t for t, _ in calibration[i:i + 64]]) for i in range(0, len(calibration), 64)])
        y = [self.flex.tasks.index(task) for _, task in calibration]
        self.flex.router = fit_router(x, y, len(self.flex.tasks), **options)
        return self.flex.router

    def route(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, M) routing weights of texts whose task is unknown: softmax of the router's logits."""
        if self.flex.router is None:
            raise ConfigError("this model has no router: train one first (`flexmerge route train`, "
                              "Runtime.train_router) on calibration examples (input, task)")
        return route_weights(self.flex.router, self.features(texts))

    def predict_routed(self, texts: Sequence[str], mode: str = "argmax") -> list[dict[str, Any]]:
        """Predictions for texts without task ids. `argmax`: each text runs as the task of its
        largest weight, the batch as one mixed pass (cost: one routing pass + one forward).
        `mixture`: per text, the weights Σ_t w_t θ_t (θ* + Σ_t w_t·residual_t at a Twin point) and the
        head of its argmax task (cost: one weight rebuild + one forward per text). Each answer
        carries `task` (the argmax) and `weights`."""
        if mode not in ("argmax", "mixture"):
            raise ConfigError(f"routing mode {mode!r}; choose one of: argmax, mixture")
        if not texts:
            return []
        w = self.route(texts)
        tasks = [self.flex.tasks[int(i)] for i in w.argmax(-1)]
        if mode == "argmax":
            answers = self.predict_mixed(list(zip(tasks, texts)))
        else:
            answers = [self._predict_mixture(task, text, weights) for task, text, weights in zip(tasks, texts, w)]
        return [{**a, "task": t, "weights": dict(zip(self.flex.tasks, ws.tolist()))}
                for a, t, ws in zip(answers, tasks, w)]

    def _predict_mixture(self, task: str, text: str, weights: torch.Tensor) -> dict[str, Any]:
        state = self.flex.with_own(task, self.flex.mixture_state_dict(weights))
        model = self._hf_model(task)
        model.load_state_dict(state, strict=True, assign=True)
        enc = self._encode(task, [text])
        with torch.inference_mode():
            return self._results([task], model.eval()(**enc), enc["attention_mask"])[0]

    # building blocks ---------------------------------------------------------------------------

    def _check(self, task: str) -> None:
        if task not in self.flex.tasks:
            raise ConfigError(f"unknown task {task!r}; this model serves: {', '.join(self.flex.tasks)}")

    def _hf_dir(self, task: str) -> Path:
        """The task's config and tokenizer files, written once to a private directory for transformers
        (or `hf_dir`, for a task whose artifact holds none)."""
        if task not in self._dirs:
            files = self.flex.hf_files.get(task)
            if (not files or "config.json" not in files) and self.hf_dir is not None:
                self._dirs[task] = self.hf_dir
                return self.hf_dir
            if not files or "config.json" not in files:
                raise FlexMergeError(f"task {task!r} has no Hugging Face config in the artifact: pass "
                                     "Runtime(..., hf_dir=DIR) with its config.json and tokenizer, or the "
                                     "task's empty model to Runtime.module(task, model)")
            if self._scratch is None:  # removed with the runtime (or at exit)
                self._scratch = tempfile.TemporaryDirectory(prefix="flexmerge-runtime-")
            self._dirs[task] = unpack_hf_files(files, self._scratch.name, task)
        return self._dirs[task]

    def _config(self, task: str):
        self._check(task)
        return load_config(self._hf_dir(task), task)

    def _hf_model(self, task: str) -> torch.nn.Module:
        shapes = [tuple(m.shape) for m in self.flex.meta.values()]
        shapes += [tuple(t.shape) for t in self.flex.specific.get(task, {}).values()]
        return build_model(self._config(task), task, shapes)

    def _tokenizer(self, task: str):
        if task not in self._tokenizers:
            self._tokenizers[task] = load_tokenizer(self._hf_dir(task), task)
        return self._tokenizers[task]

    def _encode(self, task: str, texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(self._tokenizer(task)(list(texts), padding=True, truncation=True,
                                          max_length=self._max_tokens(task), return_tensors="pt"))

    def _max_tokens(self, task: str) -> int | None:
        """Tokens kept per input: `max_length` when given, else the tokenizer's maximum capped at the
        model's positions (a tokenizer saved without one says 1e30, and a longer input would index
        past the position embeddings)."""
        if self.max_length is not None:
            return self.max_length
        if task not in self._max_tokens_of:
            limits = [getattr(self._tokenizer(task), "model_max_length", None),
                      getattr(self._config(task), "max_position_embeddings", None)]
            known = [int(n) for n in limits if isinstance(n, (int, float)) and 0 < n < 1e9]
            self._max_tokens_of[task] = min(known) if known else None
        return self._max_tokens_of[task]

    def _mixed_model(self) -> tuple[torch.nn.Module, BatchRows] | None:
        """The mixed copy of the model (`mixed_copy`), or None when a mixed batch must run per task
        (tasks whose architectures differ, or a module that is not batch-first)."""
        if not self._mixed_tried:
            modules = [self.module(t) for t in self.flex.tasks]
            self._mixed = mixed_copy(modules, lambda: self._hf_model(self.flex.tasks[0]))
            self._mixed_tried = True
            if self._mixed is not None:
                release_freed_memory()  # the random weights transformers built before the artifact's replaced them
        return self._mixed

    def _one_tokenizer(self) -> bool:
        """Whether all tasks share one tokenizer, so that a batch of texts is tokenized once (text
        generation tokenizes each prompt with its own task's tokenizer and needs no such thing)."""
        if self._shared_tokenizer is None:
            self._shared_tokenizer = len({_tokenizer_files(self.flex, t) for t in self.flex.tasks}) == 1
        return self._shared_tokenizer


def _kind(config) -> str:
    arch = (config.architectures or [""])[0]
    if arch.endswith("ForSequenceClassification"):
        return "text-classification"
    return "text-generation" if is_causal_lm(config) else "feature-extraction"


def _tokenizer_files(flex: FlexModel, task: str) -> tuple:
    files = flex.hf_files.get(task, {})
    return tuple(sorted((n, d) for n, d in files.items() if n != "config.json"))
