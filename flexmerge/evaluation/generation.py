"""Causal LMs (`*ForCausalLM`) scored on prompts with a reference completion.

Rows: `{"prompt": ..., "completion": ...}`, or `{"messages": [...]}` whose last message is the
assistant's answer; the messages before it are rendered by the task's own chat template
(`apply_chat_template(add_generation_prompt=True)`), so a task whose tokenizer has none cannot
take them. A prompt is tokenized as the tokenizer does by default (a BOS where it adds one), a
rendered chat as is (the template writes its own special tokens), a completion without special
tokens. Two metrics (`--eval-metric`):

* `exact` (the default): the fraction of prompts whose greedy completion equals the reference
  after `normalize`. Decoding is batched (the runtime's generation core,
  `flexmerge.runtime.generation`: left padding, a KV cache, rows leaving as they end), stops at
  the end-of-sequence token(s) of the tokenizer, config and generation config, and runs at most
  the longest reference completion (in tokens) + GENERATION_MARGIN new tokens.
* `loglik`: exp of the mean log-likelihood of the reference completions' tokens given their
  prompts (teacher forcing; the tokens of all rows pooled; no EOS appended), that is the
  completions' geometric-mean token probability, 1 / perplexity, in (0, 1]. Higher is better,
  and merged / fine-tuned stays a ratio of positive scores, which the sweep's normalized score
  needs: a ratio of two negative mean log-likelihoods would rank a worse model higher.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flexmerge.errors import ConfigError
from flexmerge.evaluation.data import GENERATION_FORMAT, GenerationRow, read_generation_rows
from flexmerge.evaluation.hf import (
    CAUSAL_LM,
    TaskDirs,
    check_counts,
    check_data_names,
    describe,
    load_weights,
    require_kind,
    task_side_files,
)
from flexmerge.runtime.generation import context_length, encode_prompt, generate_greedy, render_chat, stop_ids
from flexmerge.runtime.hf_model import build_model, load_config, load_tokenizer
from flexmerge.taskvec import TaskSet

METRICS = ("exact", "loglik")
GENERATION_MARGIN = 8
TRAILING_PUNCTUATION = ".,;:!?"


def normalize(text: str) -> str:
    """What exact match compares: lowercase, runs of whitespace as one space, no leading or trailing
    whitespace, trailing `.,;:!?` stripped ("Paris." and " paris" match; "Paris, France" is kept)."""
    return " ".join(text.lower().split()).rstrip(TRAILING_PUNCTUATION + " ")


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ConfigError(f"--eval-metric {metric!r}: choose one of: {', '.join(METRICS)}")


@dataclass(frozen=True)
class Encoded:
    """A row as token ids, with its reference completion normalized for exact match."""

    prompt: list[int]
    completion: list[int]
    reference: str


@dataclass
class _Task:
    """What a call needs for one task: its model (weights loaded per call), tokenizer, and its rows:
    right-padded batches (loglik) or the encoded rows and the new-token budget (exact match)."""

    name: str
    model: Any
    tokenizer: Any
    stops: tuple[int, ...]
    batch_size: int
    batches: list[tuple[torch.Tensor, torch.Tensor, list[Any]]] = field(default_factory=list)
    examples: list[Encoded] = field(default_factory=list)
    new_tokens: int = 0


class GenerationEvaluator:
    """Exact match of greedy completions (or the completions' token probability) of each task's
    causal LM on its rows (see the module's docstring). The task's config, tokenizer, chat template
    and generation config are the ones its artifact would carry; rows are tokenized and batched
    once per task, the model built once, and each call loads the given weights into it."""

    def __init__(self, tasks: TaskSet, data: Mapping[str, str | Path], metric: str = "exact",
                 limit: int | None = 1000, batch_size: int = 32):
        check_metric(metric)
        check_data_names(tasks, data)
        self._setup(task_side_files(tasks), data, metric, limit, batch_size)

    @classmethod
    def from_side_files(cls, files: Mapping[str, Mapping[str, bytes]], data: Mapping[str, str | Path],
                        metric: str = "exact", limit: int | None = 1000, batch_size: int = 32) -> GenerationEvaluator:
        """The evaluator of models whose Hugging Face side files (config, tokenizer, chat template)
        are known per task without a TaskSet: a benchmark suite's zoo, before it is read as one."""
        check_metric(metric)
        if set(files) != set(data):
            raise ConfigError(f"side files for tasks {sorted(files)} but data for {sorted(data)}")
        evaluator = cls.__new__(cls)
        evaluator._setup(files, data, metric, limit, batch_size)
        return evaluator

    def _setup(self, files: Mapping[str, Mapping[str, bytes]], data: Mapping[str, str | Path], metric: str,
               limit: int | None, batch_size: int) -> None:
        check_counts(limit, batch_size)
        self.metric = metric
        self._dirs = TaskDirs()
        self._tasks = {t: self._prepare(t, files[t], data[t], limit, batch_size) for t in files}

    def __call__(self, task: str, state: dict[str, torch.Tensor]) -> float:
        prepared = self._tasks[task]
        load_weights(prepared.model, state, task)
        with torch.inference_mode():
            return _exact_match(prepared) if self.metric == "exact" else _token_probability(prepared)

    def _prepare(self, task: str, files: Mapping[str, bytes], path: str | Path, limit: int | None,
                 batch_size: int) -> _Task:
        arch = require_kind(files, task, CAUSAL_LM)
        directory = self._dirs.unpack(task, files)
        hint = f"; {describe(CAUSAL_LM, arch, task)}: its rows are {GENERATION_FORMAT}"
        rows = read_generation_rows(path, limit, hint=hint)
        tokenizer = load_tokenizer(directory, task)
        model = build_model(load_config(directory, task), task)
        examples = [encode(tokenizer, row, path, task) for row in rows]
        _check_lengths(model.config, examples, rows, path, task)
        stops = stop_ids(directory, tokenizer, model.config)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
        if self.metric == "loglik":
            return _Task(task, model, tokenizer, stops, batch_size, batches=_right_padded(examples, pad, batch_size))
        if not stops:
            raise ConfigError(f"task {task!r}: exact match stops each completion at the end-of-sequence token, but "
                              "its tokenizer and config name none; use --eval-metric loglik")
        new_tokens = max(len(e.completion) for e in examples) + GENERATION_MARGIN
        return _Task(task, model, tokenizer, stops, batch_size, examples=examples, new_tokens=new_tokens)


def encode(tokenizer: Any, row: GenerationRow, path: str | Path, task: str) -> Encoded:
    """A row's prompt and completion as token ids (see the module's docstring for which special tokens)."""
    if row.messages is not None:
        prompt = tokenizer(_render_chat(tokenizer, row, path, task), add_special_tokens=False)["input_ids"]
    else:
        prompt = encode_prompt(tokenizer, row.prompt)
    completion = tokenizer(row.completion, add_special_tokens=False)["input_ids"]
    if not prompt or not completion:
        raise ConfigError(f"{path}: row {row.row}: the {'prompt' if not prompt else 'completion'} has no tokens")
    return Encoded(list(prompt), list(completion), normalize(row.completion))


def _render_chat(tokenizer: Any, row: GenerationRow, path: str | Path, task: str) -> str:
    """The messages before the answer, rendered by the task's chat template, ready for the answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{path}: row {row.row} is a chat ('messages'), but task {task!r}'s tokenizer has no chat "
                          'template; give {"prompt", "completion"} rows')
    try:
        return render_chat(tokenizer, list(row.messages or ()))
    except ConfigError as e:
        raise ConfigError(f"{path}: row {row.row}: task {task!r}: {e}") from None


def _check_lengths(config: Any, examples: Sequence[Encoded], rows: Sequence[GenerationRow], path: str | Path,
                   task: str) -> None:
    """A prompt and its completion fit the positions the model has (where its config states them)."""
    limit = context_length(config)
    if limit is None:
        return
    for e, row in zip(examples, rows):
        if len(e.prompt) + len(e.completion) > limit:
            raise ConfigError(f"{path}: row {row.row}: prompt and completion are {len(e.prompt) + len(e.completion)} "
                              f"tokens, more than task {task!r}'s model takes ({limit})")


def _right_padded(examples: Sequence[Encoded], pad: int, batch_size: int):
    """(ids, attention mask, (start, end) of each completion) batches of prompt + completion: right
    padding keeps every token's position what it is unbatched."""
    ordered = sorted(examples, key=lambda e: len(e.prompt) + len(e.completion))
    out = []
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start:start + batch_size]
        seqs = [e.prompt + e.completion for e in chunk]
        ids = torch.full((len(chunk), max(map(len, seqs))), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        out.append((ids, mask, [(len(e.prompt), len(e.prompt) + len(e.completion)) for e in chunk]))
    return out


def _exact_match(task: _Task) -> float:
    completions = generate_greedy(task.model, task.name, [e.prompt for e in task.examples],
                                  max_tokens=task.new_tokens, stops=task.stops, max_batch=task.batch_size)
    correct = 0
    for new, example in zip(completions, task.examples):
        text = task.tokenizer.decode(_until_stop(new, task.stops), skip_special_tokens=True)
        correct += normalize(text) == example.reference
    return correct / len(task.examples)


def _until_stop(ids: list[int], stops: tuple[int, ...]) -> list[int]:
    """The tokens before the first end-of-sequence token (which ends a completion)."""
    for n, i in enumerate(ids):
        if i in stops:
            return ids[:n]
    return ids


def _token_probability(task: _Task) -> float:
    """exp(mean log-likelihood per completion token), all rows' completion tokens pooled."""
    total, count = 0.0, 0
    for ids, mask, spans in task.batches:
        logits = task.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        for i, (start, end) in enumerate(spans):
            logp = logits[i, start - 1:end - 1].float().log_softmax(-1)
            total += float(logp.gather(-1, ids[i, start:end, None]).sum())
            count += end - start
    return math.exp(total / count)
