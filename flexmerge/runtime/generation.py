"""Text generation with causal LMs, one core for the server (the OpenAI API), `Runtime.generate`
and the evaluators (exact match of greedy completions).

A `Generator` decodes many sequences together, one forward pass per step for the whole batch, with
a KV cache (transformers' `DynamicCache`). Each `Lane` is one model that runs a batch: the mixed
copy of an artifact (`flexmerge.runtime.batching`: rows of any task, each through its own task's
weights) or one task's own module. Sequences join and leave between steps (continuous batching):

* a step first decodes the running rows (one token each), drops the rows that finished, then
  admits waiting sequences into the free places: their prompts run as one prefill pass (left
  padded), which gives their first token, and their KV cache joins the running one;
* rows are left-padded to the batch's longest row: joining pads the shorter side's cache on the
  left (masked), leaving drops the row and the leading columns no row reads any more; positions
  come from the attention mask (`cumsum - 1`), so padding never moves a token; the batch is kept
  sorted by task, so each weight set reads its rows as one slice;
* `join="static"` is the alternative measured against it: a lane admits sequences only when its
  batch is empty (dynamic batches that run until their last row ends). A lane whose cache cannot
  be merged (sliding-window layers) always works that way.

Greedy decoding (temperature 0) is argmax, the same tokens as transformers' `generate`;
temperature and top-p follow transformers' warpers (temperature first, then the smallest set of
tokens whose probability reaches top_p), sampled with a generator seeded per sequence, so a seed
gives the same tokens whatever else shares the batch. Text is decoded incrementally (each token
with a few before it, as TGI and vLLM do), cut at the first stop string, and a tail that may
begin a stop string is held back until it is known not to.
"""

from __future__ import annotations

import inspect
import itertools
import math
import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flexmerge.errors import ConfigError
from flexmerge.runtime.batching import BatchRows

__all__ = ["Generation", "Generator", "Lane", "Sampling", "TaskDecoding", "Update", "context_length",
           "encode_chat", "encode_prompt", "is_causal_lm", "render_chat", "stop_ids", "top_p_filter"]

JOIN_POLICIES = ("continuous", "static")
DETOKENIZE_WINDOW = 5  # tokens decoded before the new one, so that its leading space comes out right
POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


# ----------------------------------------------------------------------------------- the prompt


def is_causal_lm(config: Any) -> bool:
    """Whether the config's architecture is one of transformers' causal LMs (LlamaForCausalLM,
    GPT2LMHeadModel, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    arch = (getattr(config, "architectures", None) or [""])[0]
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    return isinstance(arch, str) and (arch.endswith("ForCausalLM") or arch in causal)


def context_length(config: Any) -> int | None:
    """The most positions (prompt + generated tokens) the model takes, where its config states it."""
    for name in POSITION_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """A plain prompt as token ids, with the special tokens the tokenizer adds by default (a BOS)."""
    return list(tokenizer(text)["input_ids"])


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> str:
    """The messages rendered by the tokenizer's chat template, ready for the assistant's answer."""
    import jinja2

    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("its tokenizer has no chat template")
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    except (jinja2.TemplateError, ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"its chat template refused the messages ({e})") from None


def encode_chat(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """A chat as token ids: rendered by the template, which writes its own special tokens."""
    return list(tokenizer(render_chat(tokenizer, messages), add_special_tokens=False)["input_ids"])


def stop_ids(directory: Path, tokenizer: Any, config: Any) -> tuple[int, ...]:
    """The end-of-sequence ids of the tokenizer, the config and the generation config, each once."""
    import transformers

    found = [getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None)]
    if (directory / "generation_config.json").is_file():
        found.append(transformers.GenerationConfig.from_pretrained(directory).eos_token_id)
    out: list[int] = []
    for ids in found:
        for i in ids if isinstance(ids, (list, tuple)) else [ids]:
            if isinstance(i, int) and i not in out:
                out.append(i)
    return tuple(out)


# ------------------------------------------------------------------------------- the sequences


@dataclass(frozen=True)
class Sampling:
    """How a sequence picks its tokens, with OpenAI's parameters and defaults: `temperature` 0 is
    greedy; `top_p` keeps the smallest set of tokens whose probability reaches it; `seed` makes
    sampling repeatable (top_p 0 keeps the most likely token only); generation ends at an
    end-of-sequence token, at a `stop` string (not part of the text) or after `max_tokens` tokens."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be a whole number of at least 1, got {self.max_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"temperature must be a number of at least 0, got {self.temperature!r}")
        if not (math.isfinite(self.top_p) and 0 <= self.top_p <= 1):
            raise ConfigError(f"top_p must be from 0 to 1, got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError("stop strings must be non-empty strings")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ConfigError(f"seed must be a 64-bit integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class TaskDecoding:
    """What decoding needs of a task: its tokenizer (None: tokens only, no text), its
    end-of-sequence ids, the most positions its model takes and its vocabulary size (None: not
    stated; a prompt's token ids must be below it)."""

    tokenizer: Any
    stops: tuple[int, ...]
    context: int | None = None
    vocab: int | None = None


class TextStream:
    """The text of generated tokens, decoded as they come (TGI's and vLLM's incremental method:
    the new tokens with a few before them, emitted once they decode to whole characters), cut at
    the first stop string; a tail that may be the beginning of a stop string is held back."""

    def __init__(self, tokenizer: Any, prompt: Sequence[int], stop: Sequence[str]):
        self.tokenizer = tokenizer
        self.ids = list(prompt[-DETOKENIZE_WINDOW:])
        self.prefix, self.read = 0, len(self.ids)
        self.stop = tuple(stop)
        self.text = ""  # all text so far (cut at a stop string)
        self.sent = 0  # characters of it handed out

    def push(self, token: int) -> tuple[str, bool]:
        """(the text now safe to hand out, whether a stop string ended the sequence)."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):  # U+FFFD: a character still incomplete
            old = len(self.text)
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            cut = self._stop_at(max(0, old - max(map(len, self.stop), default=0) + 1))
            if cut is not None:
                self.text = self.text[:cut]
                return self.flush(), True
        return self._take(len(self.text) - self._held()), False

    def flush(self) -> str:
        """The rest of the text, held back or not (the sequence has ended)."""
        return self._take(len(self.text))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _stop_at(self, start: int) -> int | None:
        found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _held(self) -> int:
        """The length of the longest tail of the text that begins a stop string: the earliest
        place, within a stop string's length of the end, where one could start."""
        longest = 0
        for s in self.stop:
            at = self.text.find(s[0], max(0, len(self.text) - len(s) + 1))
            while at != -1 and len(self.text) - at > longest:
                if s.startswith(self.text[at:]):
                    longest = len(self.text) - at
                    break
                at = self.text.find(s[0], at + 1)
        return longest

    def _take(self, end: int) -> str:
        out = self.text[self.sent:max(end, self.sent)]
        self.sent += len(out)
        return out


_ids = itertools.count()


class Generation:
    """One sequence being generated: its prompt, what it has produced (`tokens`, `text`) and, once
    it has ended, why (`finish_reason`: "stop" at an end-of-sequence token or a stop string,
    "length" at max_tokens)."""

    def __init__(self, task: str, prompt: Sequence[int], sampling: Sampling, decoding: TaskDecoding):
        self.id = next(_ids)
        self.task = task
        self.prompt = list(prompt)
        self.sampling = sampling
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.cancelled = False
        self._stops = frozenset(decoding.stops)
        self._stream = TextStream(decoding.tokenizer, self.prompt, sampling.stop) if decoding.tokenizer else None
        self.random: torch.Generator | None = None
        if not sampling.greedy:
            self.random = torch.Generator()
            if sampling.seed is None:
                self.random.seed()
            else:
                self.random.manual_seed(sampling.seed)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int) -> "Update":
        """Take the next token; the update carries the text it adds."""
        self.tokens.append(token)
        text = ""
        if token in self._stops:
            self.finish_reason = "stop"
        elif self._stream is not None:
            text, stopped = self._stream.push(token)
            if stopped:
                self.finish_reason = "stop"
        if self.finish_reason is None and len(self.tokens) >= self.sampling.max_tokens:
            self.finish_reason = "length"
        if self.finished and self._stream is not None:
            text += self._stream.flush()
        self.text += text
        return Update(self, text, len(self.tokens), self.finish_reason)


@dataclass(frozen=True)
class Update:
    """What one step did to a sequence: the text it added (may be empty: a character or a stop
    string not complete yet), its token count then, and its finish reason if it ended (a snapshot:
    the sequence itself moves on while the update waits to be read)."""

    generation: Generation
    text: str
    tokens: int
    finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


# ------------------------------------------------------------------------------------ sampling


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits outside the smallest set of tokens whose probability reaches `top_p` set to -inf
    (transformers' TopPLogitsWarper: tokens sorted by probability, the least likely dropped while
    their cumulative probability is at most 1 - top_p; the most likely always kept)."""
    if top_p >= 1:
        return logits
    ordered, index = torch.sort(logits, descending=False)
    drop = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
    drop[..., -1] = False
    return logits.masked_fill(drop.scatter(-1, index, drop), float("-inf"))


def sample(logits: torch.Tensor, generations: Sequence[Generation]) -> list[int]:
    """The next token of each row: argmax for greedy rows, else a draw from softmax(logits /
    temperature) after top-p, with the row's own seeded generator."""
    logits = logits.float()
    tokens = logits.argmax(-1).tolist()
    for row, g in enumerate(generations):
        if not g.sampling.greedy:
            probs = top_p_filter(logits[row] / g.sampling.temperature, g.sampling.top_p).softmax(-1)
            tokens[row] = int(torch.multinomial(probs.cpu(), 1, generator=g.random))  # the generator is on the CPU
    return tokens


# ------------------------------------------------------------------------------------ batching


@dataclass
class Lane:
    """One model that runs a batch: the mixed copy of an artifact (`rows` is its BatchRows, `tasks`
    maps each task to its index there) or one task's own module (`tasks` = {task: 0}, no rows)."""

    model: torch.nn.Module
    tasks: dict[str, int]
    rows: BatchRows | None = None
    _params: frozenset[str] = field(init=False, repr=False, default=frozenset())

    def __post_init__(self) -> None:
        self._params = frozenset(inspect.signature(self.model.forward).parameters)

    @property
    def cache_name(self) -> str:
        """transformers 5 calls the KV cache `cache`; earlier versions `past_key_values`."""
        return "cache" if "cache" in self._params else "past_key_values"

    @property
    def device(self) -> torch.device:
        """Where the model's weights are: inputs go there."""
        return next(self.model.parameters()).device

    def sort_key(self, task: str) -> int:
        return self.rows.sort_key(self.tasks[task]) if self.rows is not None else 0

    def forward(self, tasks: Sequence[str], ids: torch.Tensor, mask: torch.Tensor,
                cache: Any) -> tuple[torch.Tensor, Any]:
        """(the last position's logits [B, V], the cache) of one pass; rows sorted by `sort_key`."""
        positions = mask.cumsum(-1) - 1
        positions.masked_fill_(mask == 0, 1)  # as transformers' generate: padding positions are never read
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": True}
        if "position_ids" in self._params:
            kwargs["position_ids"] = positions[:, -ids.shape[1]:]
        if "logits_to_keep" in self._params:
            kwargs["logits_to_keep"] = 1
        if cache is not None:
            kwargs[self.cache_name] = cache
        if self.rows is not None:
            self.rows.set([self.tasks[t] for t in tasks])
        out = self.model(**kwargs)
        return out.logits[:, -1], getattr(out, self.cache_name)


class _Batch:
    """The rows one lane is decoding: their sequences (sorted by task), KV cache, attention mask
    (left padded) and the tokens to feed next."""

    def __init__(self, generations: list[Generation], cache: Any, mask: torch.Tensor, last: torch.Tensor):
        self.generations, self.cache, self.mask, self.last = generations, cache, mask, last

    def __len__(self) -> int:
        return len(self.generations)

    def keep(self, rows: list[int]) -> None:
        """Only `rows` (in that order) stay; leading columns that no row reads any more go."""
        if len(rows) == len(self.generations) and rows == list(range(len(rows))):
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.last = self.mask[index], self.last[index]
        self.generations = [self.generations[i] for i in rows]
        unread = int((self.mask.sum(0) == 0).long().cumprod(0).sum())
        if unread and _mergeable(self.cache):
            self.mask = self.mask[:, unread:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unread:], layer.values[:, :, unread:]


def _mergeable(cache: Any) -> bool:
    """Whether rows of two caches can be joined: every layer a plain DynamicLayer (no sliding window)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def _join(a: _Batch, b: _Batch) -> _Batch:
    """One batch of the rows of both, left-padded to the longer, in the row order of `a` then `b`."""
    from transformers.cache_utils import DynamicCache

    width = max(a.mask.shape[1], b.mask.shape[1])

    def pad(t: torch.Tensor, dim_from_end: int) -> torch.Tensor:
        missing = width - t.shape[-dim_from_end]
        return torch.nn.functional.pad(t, (0, 0) * (dim_from_end - 1) + (missing, 0)) if missing else t

    layers = [(torch.cat([pad(x.keys, 2), pad(y.keys, 2)]), torch.cat([pad(x.values, 2), pad(y.values, 2)]))
              for x, y in zip(a.cache.layers, b.cache.layers)]
    return _Batch(a.generations + b.generations, DynamicCache(layers), torch.cat([pad(a.mask, 1), pad(b.mask, 1)]),
                  torch.cat([a.last, b.last]))


def _left_padded(prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)  # the pad id is never read: masked
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


class Generator:
    """Decodes the sequences submitted to it together, step by step (see the module docstring).

    `submit` and `cancel` may be called from any thread; `step` from one thread at a time. Each
    forward pass holds `lock` (the runtime's: its mixed model is shared with classification)."""

    def __init__(self, lanes: Sequence[Lane], tasks: Mapping[str, TaskDecoding], *, max_batch: int = 32,
                 join: str = "continuous", lock: Any = None):
        if join not in JOIN_POLICIES:
            raise ConfigError(f"join {join!r}: choose one of: {', '.join(JOIN_POLICIES)}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be a whole number of at least 1, got {max_batch!r}")
        self.lanes = list(lanes)
        self.tasks = dict(tasks)
        self.max_batch = max_batch
        self.join = join
        self._lock = lock if lock is not None else nullcontext()
        self._lane_of = {t: i for i, lane in enumerate(self.lanes) for t in lane.tasks if t in self.tasks}
        missing = [t for t in self.tasks if t not in self._lane_of]
        if missing:
            raise ConfigError(f"task {missing[0]!r} has no model to run it")
        self._intake: deque[Generation] = deque()
        self._intake_lock = threading.Lock()
        self._waiting: deque[Generation] = deque()
        self._batches: list[_Batch | None] = [None] * len(self.lanes)
        self.passes = 0  # forward passes run: prefills and decode steps

    # the public contract ----------------------------------------------------------------------

    def submit(self, task: str, prompt: Sequence[int], sampling: Sampling) -> Generation:
        """Queue a sequence; it joins the batch at a coming step. A prompt that leaves no room for
        `max_tokens` in the model's positions is refused here."""
        if task not in self.tasks:
            raise ConfigError(f"unknown task {task!r}; this generator serves: {', '.join(self.tasks)}")
        if not prompt:
            raise ConfigError("the prompt has no tokens")
        vocab = self.tasks[task].vocab
        bad = next((i for i in prompt if isinstance(i, bool) or not isinstance(i, int) or i < 0
                    or (vocab is not None and i >= vocab)), None)
        if bad is not None:
            raise ConfigError(f"the prompt holds token id {bad!r}, which is not in the model's vocabulary "
                              f"(0 to {vocab - 1 if vocab else 'its size'})")
        context = self.tasks[task].context
        if context is not None and len(prompt) + sampling.max_tokens > context:
            raise ContextLengthError(context, len(prompt), sampling.max_tokens)
        generation = Generation(task, prompt, sampling, self.tasks[task])
        with self._intake_lock:
            self._intake.append(generation)
        return generation

    @staticmethod
    def cancel(generation: Generation) -> None:
        """Stop a sequence (its client went away); it leaves the batch at the next step."""
        generation.cancelled = True

    @property
    def busy(self) -> bool:
        """Whether any sequence is waiting or running."""
        return bool(self._intake or self._waiting or any(self._batches))

    @property
    def running(self) -> int:
        return sum(len(b) for b in self._batches if b is not None)

    def step(self) -> list[Update]:
        """Decode one token of every running row, then admit waiting sequences (their prefill
        gives their first token). Returns what each sequence produced."""
        with self._intake_lock:
            self._waiting.extend(self._intake)
            self._intake.clear()
        updates: list[Update] = []
        with torch.inference_mode():
            for lane in range(len(self.lanes)):
                self._drop_cancelled(lane)
                if self._batches[lane]:
                    updates += self._decode(lane)
            for lane, newcomers in self._admit().items():
                updates += self._prefill(lane, newcomers)
        return updates

    def run(self) -> None:
        """Step until every submitted sequence has ended (offline use: evaluation, benchmarks)."""
        while self.busy:
            self.step()

    def abort(self) -> list[Generation]:
        """Drop every sequence, waiting or running (after a failed step); returns them."""
        with self._intake_lock:
            dropped = [*self._intake, *self._waiting]
            self._intake.clear()
        self._waiting.clear()
        for lane, batch in enumerate(self._batches):
            if batch is not None:
                dropped += batch.generations
            self._batches[lane] = None
        return dropped

    # the steps ----------------------------------------------------------------------------------

    def _drop_cancelled(self, lane: int) -> None:
        self._waiting = deque(g for g in self._waiting if not g.cancelled)
        batch = self._batches[lane]
        if batch is not None and any(g.cancelled for g in batch.generations):
            self._settle(lane, [i for i, g in enumerate(batch.generations) if not g.cancelled])

    def _admit(self) -> dict[int, list[Generation]]:
        """Waiting sequences, first come first served, into the places free; a lane that cannot
        take rows mid-flight (`static`, or a cache that cannot be merged) only when it is empty."""
        room = self.max_batch - self.running
        admitted: dict[int, list[Generation]] = {}
        left: deque[Generation] = deque()
        for g in self._waiting:
            lane = self._lane_of[g.task]
            batch = self._batches[lane]
            closed = batch is not None and (self.join == "static" or not _mergeable(batch.cache))
            if room > 0 and not closed:
                admitted.setdefault(lane, []).append(g)
                room -= 1
            else:
                left.append(g)
        self._waiting = left
        return admitted

    def _prefill(self, lane: int, newcomers: list[Generation]) -> list[Update]:
        model = self.lanes[lane]
        newcomers = sorted(newcomers, key=lambda g: model.sort_key(g.task))
        ids, mask = (t.to(model.device) for t in _left_padded([g.prompt for g in newcomers]))
        with self._lock:
            logits, cache = model.forward([g.task for g in newcomers], ids, mask, None)
        self.passes += 1
        tokens = sample(logits, newcomers)
        updates = [g.push(t) for g, t in zip(newcomers, tokens)]
        fresh = _Batch(newcomers, cache, mask, torch.tensor(tokens, dtype=torch.long, device=mask.device))
        fresh.keep([i for i, g in enumerate(newcomers) if not g.finished])
        if not fresh:
            return updates
        running = self._batches[lane]
        if running is None:
            self._batches[lane] = fresh
        else:
            joined = _join(running, fresh)
            joined.keep(sorted(range(len(joined)), key=lambda i: model.sort_key(joined.generations[i].task)))
            self._batches[lane] = joined
        return updates

    def _decode(self, lane: int) -> list[Update]:
        batch = self._batches[lane]
        assert batch is not None
        model = self.lanes[lane]
        mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch), 1))], dim=1)
        with self._lock:
            logits, batch.cache = model.forward([g.task for g in batch.generations], batch.last[:, None], mask,
                                                batch.cache)
        self.passes += 1
        batch.mask = mask
        tokens = sample(logits, batch.generations)
        batch.last = torch.tensor(tokens, dtype=torch.long, device=mask.device)
        updates = [g.push(t) for g, t in zip(batch.generations, tokens)]
        self._settle(lane, [i for i, g in enumerate(batch.generations) if not g.finished])
        return updates

    def _settle(self, lane: int, alive: list[int]) -> None:
        batch = self._batches[lane]
        assert batch is not None
        if not alive:
            self._batches[lane] = None
        else:
            batch.keep(alive)


class ContextLengthError(ConfigError):
    """A prompt and its max_tokens exceed the model's positions."""

    def __init__(self, context: int, prompt: int, max_tokens: int):
        self.context, self.prompt, self.max_tokens = context, prompt, max_tokens
        super().__init__(f"this model's maximum context length is {context} tokens; the prompt has {prompt} and "
                         f"max_tokens asks for {max_tokens} more ({prompt + max_tokens} in all): shorten the prompt "
                         "or lower max_tokens")


def generate_greedy(model: torch.nn.Module, task: str, prompts: Iterable[Sequence[int]], *, max_tokens: int,
                    stops: Sequence[int], max_batch: int = 32) -> list[list[int]]:
    """Greedy completions of a plain causal LM, batched: each prompt's new tokens, up to and
    including the first of `stops` (the evaluators' exact match)."""
    generator = Generator([Lane(model, {task: 0})], {task: TaskDecoding(None, tuple(stops))}, max_batch=max_batch)
    runs = [generator.submit(task, p, Sampling(max_tokens=max_tokens, temperature=0.0)) for p in prompts]
    generator.run()
    return [g.tokens for g in runs]
