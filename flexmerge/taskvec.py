"""Task vectors: a base model and M fine-tuned models, validated, read one tensor chunk at a time.

`load_tasks` opens every checkpoint lazily and makes one streaming pass that validates the inputs
(keys, shapes, dtypes, finite values, no fine-tune equal to the base) and finds the parameters
that are identical in all models (frozen: stored once, never merged, not part of the size unit).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol
from pathlib import Path

import torch
import xxhash

from flexmerge._scratch import DELTAS, release, scratch
from flexmerge.errors import CheckpointError, ConfigError, FlexMergeWarning
from flexmerge.executors import get_executor
from flexmerge.paths import check_task_name
from flexmerge.io.open import open_checkpoint
from flexmerge.io.side_files import moved_token, own_side_files, read_hf_side_files, side_groups, token_ids
from flexmerge.io.source import (
    HF_SIDE_GROUPS,
    CheckpointSource,
    TensorMeta,
    file_record,
    read_rows,
    read_rows_into,
    rows_shape,
)

# Per model; bounds the memory of every streaming pass. 256K fp32 entries are 1 MiB: the M task
# vectors of a chunk stay in the 32 MiB L3 between the conversion, the Gram product and a merge,
# where 4M-entry chunks went through DRAM for each (1.9x slower per entry, measured in ta_floor).
CHUNK_ELEMENTS = 256 * 1024

# How the validation pass fingerprints every input's content (the resume key and the manifest's
# provenance). xxh3-128 runs at ~25 GB/s per core, sha256 at ~1.7 GB/s (the two would be 0.1 s
# and 1.5 s of an 8-model 134M merge); sha256 is for who wants a cryptographic record.
INPUT_HASHES = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
DEFAULT_INPUT_HASH = "xxh3_128"


def new_hasher(name: str):
    """A fresh hashlib-style object (update / hexdigest) of one of INPUT_HASHES."""
    try:
        return INPUT_HASHES[name]()
    except KeyError:
        raise ConfigError(f"unknown input hash {name!r}; choose one of: {', '.join(INPUT_HASHES)}") from None


@dataclass(frozen=True)
class Chunk:
    """Rows [start, stop) of one tensor (rows=None: the whole tensor)."""

    key: str
    rows: tuple[int, int] | None


class PassObserver(Protocol):
    """Work a later stage hands to the validation pass, which computes every chunk's task vectors
    anyway, so that the stage needs no pass over the inputs of its own (a 1x merge, the trim's
    magnitude histogram). Observers run in this process (executor "local"); elsewhere they are
    not called and their stage makes its own pass."""

    name: str

    def begin(self, meta: Mapping[str, TensorMeta], num_tasks: int) -> bool:
        """Whether to observe this pass (e.g. what it keeps fits its memory budget)."""

    def see(self, chunk: Chunk, base: torch.Tensor, deltas: torch.Tensor) -> None:
        """One chunk of a floating key: the base in the compute dtype (fp32) and the (M, ...) task
        vectors (reused buffers: copy what is kept)."""

    def finish(self, tasks: "TaskSet") -> object:
        """The result, which the task set holds as `first_pass[name]`; `tasks` knows the frozen keys by now."""


@dataclass(frozen=True)
class TaskSet:
    """The base model, the named task models, and what the validation pass learned about them: a
    value, made once by `load_tasks`. Later stages pass what they compute (a fitted preprocessing,
    a plan) along as values of their own; nothing is written onto a task set."""

    names: list[str]
    base: CheckpointSource
    sources: list[CheckpointSource]
    meta: dict[str, TensorMeta]
    mergeable: list[str]
    frozen: list[str]
    # per model ("base", then the tasks): its files and a hash of its tensors' content, keyed by
    # the hash's name (INPUT_HASHES)
    provenance: dict[str, dict[str, object]] = field(default_factory=dict)
    key_grams: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # raw (M, M) per key
    compute_dtype: torch.dtype = torch.float32
    first_pass: dict[str, object] = field(default_factory=dict, repr=False)  # PassObserver results, by name
    # per task: its own parameters (heads, keys the base lacks or has in another shape), never merged;
    # a key that is also in `meta` is one whose rows the task extended (added tokens): its own part
    # is the rows past the base's, which merge like any parameter
    specific: dict[str, dict[str, TensorMeta]] = field(default_factory=dict)
    # per task, its own keys that no --task-specific pattern or head names: the base lacks them or
    # shapes them otherwise, which a wrong base model would also do (the CLI says so in one line)
    undeclared_specific: dict[str, list[str]] = field(default_factory=dict)
    # "base": every task is read over the base's vocabulary (mergekit's `tokenizer_source: base`);
    # rows a fine-tune added past the base's are dropped, not kept as its own
    vocabulary: str = "tasks"

    @property
    def num_tasks(self) -> int:
        return len(self.names)

    def index(self, task: str) -> int:
        try:
            return self.names.index(task)
        except ValueError:
            raise ConfigError(f"unknown task {task!r}; tasks are: {', '.join(self.names)}") from None

    def mergeable_bytes(self) -> int:
        """Bytes of the mergeable parameters of one model, as the inputs store them (the size unit,
        `flexmerge.size.model_unit`, adds the tasks' own and follows the dtype a method stores)."""
        return sum(self.meta[k].numel * self.meta[k].dtype.itemsize for k in self.mergeable)

    def frozen_bytes(self) -> int:
        return sum(self.meta[k].numel * self.meta[k].dtype.itemsize for k in self.frozen)

    def specific_bytes(self) -> int:
        """Bytes of every task's own parameters, all tasks together (stored once per task)."""
        return sum(m.numel * m.dtype.itemsize for keys in self.specific.values() for m in keys.values())

    def read_specific(self, task: int) -> dict[str, torch.Tensor]:
        """Task `task`'s own parameters, as stored in its checkpoint (of a key whose rows it
        extended, the rows past the base's)."""
        src = self.sources[task]
        return {k: read_own(src, k, self.meta.get(k)) for k in self.specific.get(self.names[task], {})}

    def finetuned_state_dict(self, task: int) -> dict[str, torch.Tensor]:
        """The fine-tuned model of `task` as given: shared keys, then its own."""
        shared = {k: self.read_task(task, Chunk(k, None)) for k in self.meta}
        return with_own(shared, self.read_specific(task))

    def task_rows(self, task: int, chunk: Chunk) -> tuple[int, int] | None:
        """The rows of `chunk` in task `task`'s checkpoint: all of a key it has in the base's shape,
        the base's rows of one whose rows it extended (its added tokens are its own, or dropped)."""
        if (chunk.rows is None and chunk.key in self.meta
                and self.sources[task].meta(chunk.key).shape[0] != self.meta[chunk.key].shape[0]):
            return (0, self.meta[chunk.key].shape[0])
        return chunk.rows

    def read_base(self, chunk: Chunk) -> torch.Tensor:
        return read_rows(self.base, chunk.key, chunk.rows)

    def read_task(self, task: int, chunk: Chunk) -> torch.Tensor:
        return read_rows(self.sources[task], chunk.key, self.task_rows(task, chunk))

    def read_base32(self, chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        """The base's chunk as stored and in the compute dtype, both in this thread's reused
        buffers (valid until the next call)."""
        shape = rows_shape(self.meta[chunk.key].shape, chunk.rows)
        raw = scratch("base.raw", shape, self.base.meta(chunk.key).dtype)
        read_rows_into(self.base, chunk.key, chunk.rows, raw)
        return raw, scratch("base.base32", shape, self.compute_dtype).copy_(raw)

    def deltas(self, chunk: Chunk, tasks: Sequence[int] | None = None, base32: torch.Tensor | None = None,
               out: torch.Tensor | None = None, hashers: Sequence | None = None) -> torch.Tensor:
        """Task vectors of `tasks` (default: all) on `chunk`, stacked as (n, *shape) in fp32.

        `base32`: the base's chunk in the compute dtype, when the caller has it; `out`: where to
        write them (default: a new tensor); `hashers`: one hashlib object per task, fed the raw
        bytes read. The models are read into a reused buffer, so a pass over many chunks allocates
        nothing per chunk (see `_scratch`)."""
        idx = range(self.num_tasks) if tasks is None else tasks
        shape = rows_shape(self.meta[chunk.key].shape, chunk.rows)
        if base32 is None:
            _, base32 = self.read_base32(chunk)
        if out is None:
            out = torch.empty((len(idx), *shape), dtype=self.compute_dtype)
        dtypes = [self.sources[t].meta(chunk.key).dtype for t in idx]
        if len(set(dtypes)) == 1:
            # One buffer for all rows, then the conversion and θ0's subtraction as two ops over all
            # of them: 0.45 ms per 8 x 256K chunk against 0.62 ms as two ops per row (fewer calls,
            # both cores on each); in a whole pass that is within the machine's noise.
            raw = scratch("deltas.raw", (len(idx), *shape), dtypes[0])
            for i, t in enumerate(idx):
                self._read_into(t, chunk, raw[i], hashers[i] if hashers else None)
            return out.copy_(raw).sub_(base32)
        for i, (t, dtype) in enumerate(zip(idx, dtypes)):  # mixed dtypes: row by row
            raw = self._read_into(t, chunk, scratch("deltas.raw", shape, dtype), hashers[i] if hashers else None)
            out[i].copy_(raw).sub_(base32)  # torch.sub(raw, base32) would allocate an fp32 copy of raw
        return out

    def _read_into(self, task: int, chunk: Chunk, dest: torch.Tensor, hasher=None) -> torch.Tensor:
        read_rows_into(self.sources[task], chunk.key, self.task_rows(task, chunk), dest)
        if hasher is not None:
            hash_tensor(hasher, dest)
        return dest

    def chunks(self, key: str, rows: tuple[int, int] | None = None) -> Iterator[Chunk]:
        """Split rows [start, stop) of `key` into chunks of at most CHUNK_ELEMENTS elements."""
        shape = self.meta[key].shape
        if len(shape) == 0 or (rows is None and self.meta[key].numel <= CHUNK_ELEMENTS):
            yield Chunk(key, rows)
            return
        start, stop = rows if rows is not None else (0, shape[0])
        row_numel = max(1, self.meta[key].numel // max(shape[0], 1))
        step = max(1, CHUNK_ELEMENTS // row_numel)
        for a in range(start, stop, step):
            yield Chunk(key, (a, min(stop, a + step)))


@dataclass(frozen=True)
class TaskSetSpec:
    """What a worker process needs to reopen a task set: paths and what validation learned."""

    names: tuple[str, ...]
    base: str
    models: tuple[str, ...]
    meta: tuple[tuple[str, TensorMeta], ...]
    mergeable: tuple[str, ...]
    frozen: tuple[str, ...]
    specific: tuple[tuple[str, tuple[tuple[str, TensorMeta], ...]], ...] = ()  # what rows a task reads


def spec_of(tasks: TaskSet) -> TaskSetSpec:
    return TaskSetSpec(tuple(tasks.names), str(tasks.base.path), tuple(str(s.path) for s in tasks.sources),
                       tuple(tasks.meta.items()), tuple(tasks.mergeable), tuple(tasks.frozen),
                       tuple((t, tuple(own.items())) for t, own in tasks.specific.items()))


def for_executor(tasks: TaskSet, executor) -> TaskSet | TaskSetSpec:
    """What to hand an executor's work functions: the task set itself in-process, else its spec."""
    return tasks if executor.name == "local" else spec_of(tasks)


_OPENED: dict[TaskSetSpec, TaskSet] = {}


def as_taskset(tasks: TaskSet | TaskSetSpec) -> TaskSet:
    """A task set itself, or one reopened (once per process) from its spec, without re-validation."""
    if isinstance(tasks, TaskSet):
        return tasks
    if tasks not in _OPENED:
        base = open_checkpoint(tasks.base)
        _OPENED[tasks] = TaskSet(list(tasks.names), base, [open_checkpoint(p, base=base) for p in tasks.models],
                                 dict(tasks.meta), list(tasks.mergeable), list(tasks.frozen),
                                 specific={t: dict(own) for t, own in tasks.specific})
    return _OPENED[tasks]


def read_own(src: CheckpointSource, key: str, shared: TensorMeta | None) -> torch.Tensor:
    """A task's own part of `key`: the whole tensor, or with `shared` (the base's meta of a key
    whose rows the task extended) the rows past the base's."""
    if shared is None:
        return src.read(key).contiguous()
    return read_rows(src, key, (shared.shape[0], src.meta(key).shape[0])).contiguous()


def with_own(shared: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A task's full weights: `shared` with its `own` parameters put in, a whole tensor as it is,
    the rows it added to a shared key (added tokens) after the shared rows, in their dtype."""
    out = dict(shared)
    for k, t in own.items():
        out[k] = torch.cat([out[k], t.to(out[k].dtype)]) if k in out else t
    return out


def parse_task_specs(specs: Sequence[str] | Mapping[str, str | Path]) -> dict[str, Path]:
    """`["name=path", ...]` or a mapping -> ordered {name: path}; duplicate names are an error."""
    if isinstance(specs, Mapping):
        return {check_task_name(k): Path(v) for k, v in specs.items()}
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = str(spec).partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"model spec {spec!r} must be NAME=PATH")
        check_task_name(name, f"model spec {spec!r}")
        if name in out:
            raise ConfigError(f"duplicate task name {name!r} (given for {out[name]} and {path})")
        out[name] = Path(path)
    return out


def load_tasks(
    base: str | Path,
    models: Sequence[str] | Mapping[str, str | Path],
    *,
    task_specific: Sequence[str] = (),
    allow_mixed_dtypes: bool = False,
    max_relative_change: float = 0.5,
    executor=None,
    input_hash: str = DEFAULT_INPUT_HASH,
    observers: Sequence[PassObserver] = (),
    key_grams: bool = True,
    base_may_be_a_task: bool = False,
    vocabulary: Literal["tasks", "base"] = "tasks",
    min_tasks: int = 2,
    freeze_equal: bool = True,
) -> TaskSet:
    """Open and validate the base and the task models; find the frozen and task-specific parameters.

    A parameter is task-specific (each task keeps its own; never planned or merged) when a
    fine-tune has it and the base does not, when its shape differs from the base's, when its name
    matches one of the `task_specific` regexes (full match), or, for Hugging Face inputs, when it
    belongs to a classifier head (`HF_HEADS`). Output embeddings (`lm_head`) merge like any
    parameter, as in mergekit. A fine-tune that added rows to a parameter (added tokens: a larger
    `embed_tokens` / `lm_head`) merges the base's rows and keeps the rows past them as its own.
    Under a config that ties the word embeddings, a stored copy of the input embeddings
    (`TIED_COPY`, equal in every model that holds it) is left out, as `save_pretrained` leaves it.
    `executor` ("local", "ray" or an Executor) runs the validation pass key by key. `input_hash`
    (a name in INPUT_HASHES) fingerprints each model's content for provenance and resume;
    `observers` (`PassObserver`) do a later stage's work in the same pass (`api.first_pass_for`).
    `key_grams`: accumulate each key's Gram matrix of raw task vectors in the same pass, for the
    similarity of a plan without preprocessing; a merge that makes no such plan (TIES, a 1x TA;
    `api.uses_key_grams`) skips that product, and a plan made anyway runs its own similarity pass.
    `base_may_be_a_task`: a task identical to the base is accepted (a method that merges the models'
    weights, such as slerp, may take the base as one of them); by default it is an error, the sign
    of a wrong file. `vocabulary="base"` (mergekit's `tokenizer_source: base`): every task is read
    over the base's vocabulary, the rows a fine-tune added dropped, so that 1x is one model; each
    task's tokenizer must give every base token the base's id (mergekit maps rows by token).
    `min_tasks`: 1 for a method that takes one model (passthrough). `freeze_equal=False`: a
    floating-point key every model holds alike is merged all the same (not frozen), for a method
    whose result on equal inputs is not that input (passthrough's `scale`)."""
    named = parse_task_specs(models)
    if "base" in named:  # the manifest records the inputs by name, the base as "base"
        raise ConfigError("task name 'base' is reserved for the base model (the manifest records the inputs by "
                          "name); give the task another name")
    if len(named) < min_tasks:
        raise ConfigError(f"merging needs at least {min_tasks} task models, got {len(named)}")
    patterns = _compile_patterns(task_specific)
    if vocabulary not in VOCABULARIES:
        raise ConfigError(f"vocabulary must be one of {', '.join(VOCABULARIES)}, got {vocabulary!r}")
    new_hasher(input_hash)  # an unknown name fails before any model is read
    base_src = open_checkpoint(base)
    sources = [open_checkpoint(p, base=base_src) for p in named.values()]  # PEFT adapters read against the base
    meta, specific, unexplained = _check_structure(base_src, sources, list(named), allow_mixed_dtypes, patterns,
                                                   vocabulary)
    ex = get_executor(executor)
    active = [o for o in observers if o.begin(meta, len(sources))] if ex.name == "local" else []
    mergeable, frozen, key_grams, digests = _scan_values(base_src, sources, list(named), meta, specific,
                                                         max_relative_change, ex, input_hash, active, key_grams,
                                                         base_may_be_a_task, freeze_equal)
    digests = [digests[0], *(_with_specific(d, src, specific[name], input_hash, meta)
                             for d, src, name in zip(digests[1:], sources, named))]
    provenance = {name: {"files": [file_record(f) for f in src.files()], input_hash: digest}
                  for name, src, digest in zip(["base", *named], [base_src, *sources], digests)}
    if unexplained:
        warnings.warn(undeclared_note(unexplained), FlexMergeWarning, stacklevel=2)
    tasks = TaskSet(list(named), base_src, sources, meta, mergeable, frozen, provenance, key_grams=key_grams,
                    specific=specific, undeclared_specific=unexplained, vocabulary=vocabulary)
    return dataclasses.replace(tasks, first_pass={o.name: o.finish(tasks) for o in active})


VOCABULARIES = ("tasks", "base")
# Hugging Face classifier heads: a task's own output layers, detected without a pattern. Output
# embeddings (`lm_head`) are not among them: they merge like any parameter, as in mergekit.
HF_HEADS = ("classifier", "score", "qa_outputs")
# Keys that a config with tie_word_embeddings holds as the input embeddings themselves (Llama's and
# GPT-2's lm_head, T5's and BART's lm_head and encoder/decoder embed_tokens beside `shared`).
TIED_COPY = re.compile(r"(.*\.)?(lm_head|(encoder|decoder)\.embed_tokens)\.weight")


def _compile_patterns(patterns: Sequence[str]) -> list[re.Pattern]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except (re.error, TypeError) as e:
            raise ConfigError(f"task-specific pattern {p!r} is not a valid regular expression ({e})") from None
    return out


def _check_patterns_match(patterns: Sequence[re.Pattern], sources: Sequence[CheckpointSource]) -> None:
    """A task-specific pattern that names no parameter of any checkpoint is a typo, not a choice:
    refused, so that a merge never silently merges what the user meant to keep per task."""
    keys = {k for src in sources for k in src.keys()}
    for p in patterns:
        if not any(p.fullmatch(k) for k in keys):
            near = sorted(k for k in keys if p.search(k))[:3]
            hint = (f"; it occurs inside {', '.join(near)}: write the whole name, e.g. '{re.escape(near[0])}', "
                    f"or '{p.pattern}.*'") if near else ""
            raise ConfigError(f"task-specific pattern {p.pattern!r} matches no parameter name (patterns match whole "
                              f"names){hint}")


def _hf_head_keys(src: CheckpointSource, keys: Sequence[str]) -> set[str]:
    """The keys of `src`'s classifier heads, when it is a Hugging Face directory."""
    if src.hf_dir is None:
        return set()
    return {k for k in keys if k.split(".", 1)[0] in HF_HEADS}


def _ties_embeddings(src: CheckpointSource) -> bool:
    """Whether `src` is a Hugging Face directory whose config ties the word embeddings (absent from
    config.json: transformers' default, true)."""
    return src.hf_dir is not None and _hf_config(src.hf_dir).get("tie_word_embeddings", True) is not False


def _tied_copy_of(src: CheckpointSource, key: str) -> str | None:
    """The key `src` holds `key` as a copy of (same shape, equal values; not itself a tied copy)."""
    shape, value = src.meta(key).shape, None
    for other in src.keys():
        if other != key and not TIED_COPY.fullmatch(other) and src.meta(other).shape == shape:
            value = src.read(key) if value is None else value
            if torch.equal(src.read(other), value):
                return other
    return None


def _tied_copies(models: Sequence[CheckpointSource]) -> set[str]:
    """The keys to leave out as tied copies of the input embeddings: every model that holds one
    ties the word embeddings and holds it equal to another of its keys. A copy that some model
    holds with values of its own is a parameter like any other (transformers then unties it too)."""
    names = {k for src in models for k in src.keys() if TIED_COPY.fullmatch(k)}
    return {k for k in names
            if all(k not in src.keys() or (_ties_embeddings(src) and _tied_copy_of(src, k)) for src in models)}


def _adds_rows(shape: tuple[int, ...], base: tuple[int, ...]) -> bool:
    """A fine-tune's shape that extends the base's by rows (added tokens), the rest equal."""
    return len(shape) == len(base) >= 1 and shape[0] > base[0] and shape[1:] == base[1:]


def _hf_config(directory: Path) -> dict:
    import json

    f = directory / "config.json"
    if not f.is_file():
        return {}
    try:
        config = json.loads(f.read_bytes()[: 16 << 20].decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{f}: not a readable Hugging Face config ({e})") from None
    return config if isinstance(config, dict) else {}


def _check_structure(
    base: CheckpointSource, sources: list[CheckpointSource], names: list[str], allow_mixed_dtypes: bool,
    patterns: Sequence[re.Pattern] = (), vocabulary: str = "tasks",
) -> tuple[dict[str, TensorMeta], dict[str, dict[str, TensorMeta]], dict[str, list[str]]]:
    """The shared keys' metadata (the base's, minus task-specific keys), each task's own keys (of a
    key whose rows it extended, the meta of the rows past the base's; none over the base's
    `vocabulary`), and per task the own keys that nothing declared: no pattern or head names them,
    the base lacks them or shapes them otherwise (what a wrong base model looks like, too)."""
    tied = _tied_copies([base, *sources])
    base_keys = [k for k in base.keys() if k not in tied]
    base_set = set(base_keys)
    _check_patterns_match(patterns, [base, *sources])
    own: set[str] = {k for k in base_keys if any(p.fullmatch(k) for p in patterns)}
    own |= set().union(*(_hf_head_keys(src, src.keys()) for src in [base, *sources])) & base_set
    grown: set[str] = set()
    for src in sources:
        keys = set(src.keys())
        missing = [k for k in base_keys if k not in keys and k not in own]
        if missing:
            raise CheckpointError(
                f"{src.path}: keys of the base {base.path} are missing: {missing[:5]}{'...' if len(missing) > 5 else ''}"
                " (a fine-tune must hold every shared parameter; mark the others --task-specific)")
        for k in base_keys:
            if k in keys and src.meta(k).shape != base.meta(k).shape:
                (grown if _adds_rows(src.meta(k).shape, base.meta(k).shape) else own).add(k)
    meta = {k: base.meta(k) for k in base_keys if k not in own}
    specific: dict[str, dict[str, TensorMeta]] = {}
    unexplained: dict[str, list[str]] = {}
    for name, src in zip(names, sources):
        for k in meta:
            m = src.meta(k)
            if m.dtype != meta[k].dtype and not (allow_mixed_dtypes and m.dtype.is_floating_point):
                raise CheckpointError(
                    f"{src.path}: key {k!r} has dtype {m.dtype}, the base has {meta[k].dtype} "
                    "(pass allow_mixed_dtypes=True / --allow-mixed-dtypes to merge them in fp32)"
                )
        specific[name] = {k: src.meta(k) for k in src.keys() if k not in meta and k not in tied}
        explained = _hf_head_keys(src, src.keys()) | grown
        unexplained[name] = sorted(k for k in specific[name]
                                   if k not in explained and not any(p.fullmatch(k) for p in patterns))
        if vocabulary == "base":  # the added rows are dropped: the export carries the base's tokenizer
            _check_token_ids(name, src, base)
            continue
        extended = {k: meta[k] for k in meta if k in grown}  # in the base's order
        specific[name] |= {k: _added_rows(src.meta(k), m) for k, m in extended.items() if src.meta(k).shape != m.shape}
        _check_side_files(name, src, base, extended, specific[name])
    return meta, specific, {name: keys for name, keys in unexplained.items() if keys}


def undeclared_note(undeclared: Mapping[str, Sequence[str]], shown: int = 4) -> str:
    """One line naming the tensors tasks keep as their own only because the base lacks them or
    shapes them otherwise."""
    per_task = "; ".join(f"{task}: {', '.join(keys[:shown])}{f' and {len(keys) - shown} more' if len(keys) > shown else ''}"
                         for task, keys in undeclared.items())
    return (f"kept as each task's own, never merged, because the base lacks them or shapes them otherwise: "
            f"{per_task} (a wrong base model looks the same; if they are the tasks' own, say so with "
            "--task-specific REGEX)")


def _added_rows(task: TensorMeta, base: TensorMeta) -> TensorMeta:
    """The meta of the rows a task added past the base's."""
    return TensorMeta((task.shape[0] - base.shape[0], *task.shape[1:]), task.dtype)


def _check_side_files(name: str, src: CheckpointSource, base: CheckpointSource, grown: Mapping[str, TensorMeta],
                      own: Mapping[str, TensorMeta]) -> None:
    """A task that added tokens must carry its own config and tokenizer where the base has them:
    its export would otherwise take the base's, which know nothing of the added rows."""
    added = [k for k in grown if k in own]
    if not added:
        return
    theirs, mine = side_groups(read_hf_side_files(base)), side_groups(own_side_files(src))
    lacking = [g for g in ("config", "tokenizer") if g in theirs and g not in mine]
    if lacking:
        k = added[0]
        raise CheckpointError(
            f"task {name!r} ({src.path}) adds {own[k].shape[0]} rows to {k!r} (the base has {grown[k].shape[0]}, "
            f"it has {grown[k].shape[0] + own[k].shape[0]}) but has no {' or '.join(lacking)} files of its own: "
            "its export would carry the base's, which lack the added tokens; save them beside its weights "
            "(tokenizer.save_pretrained(dir), model.config.save_pretrained(dir))")


def _check_token_ids(name: str, src: CheckpointSource, base: CheckpointSource) -> None:
    """Over the base's vocabulary, a task's row i must be the base's token i: its own tokenizer
    (when it has one) gives every base token the base's id, as mergekit, which maps rows by token
    string, then takes the same rows."""
    mine = own_side_files(src)
    if "tokenizer" not in side_groups(mine):
        return  # the fine-tune uses the base's tokenizer
    theirs = read_hf_side_files(base)
    if all(mine.get(n) == theirs.get(n) for n in HF_SIDE_GROUPS["tokenizer"]):
        return
    base_ids, task_ids = token_ids(theirs, f"the base {base.path}"), token_ids(mine, f"task {name!r} ({src.path})")
    if base_ids is None or task_ids is None:
        raise CheckpointError(
            f"tokenizer_source base: task {name!r} ({src.path}) has a tokenizer of its own and "
            f"{'the base' if base_ids is None else 'it'} has no tokenizer.json to check that every base token keeps "
            "its id; save the fast tokenizer (tokenizer.save_pretrained(dir) writes tokenizer.json)")
    moved = moved_token(base_ids, task_ids)
    if moved:
        raise CheckpointError(
            f"tokenizer_source base: task {name!r} ({src.path}) numbers the base's tokens otherwise ({moved}), "
            "so its embedding rows are not the base's tokens; re-mapping rows by token is tokenizer surgery: "
            "use mergekit-yaml")


def _with_specific(digest: str, src: CheckpointSource, keys: Mapping[str, TensorMeta], input_hash: str,
                   shared: Mapping[str, TensorMeta]) -> str:
    """A task's content digest extended by its task-specific tensors (of a shared key, the rows it
    added), each checked for NaN/Inf."""
    if not keys:
        return digest
    h = new_hasher(input_hash)
    h.update(digest.encode())
    for k, mt in keys.items():
        t = read_own(src, k, shared.get(k))
        _check_finite(t, src, k)
        h.update(f"{k}\0{mt.dtype}\0{list(mt.shape)}\0".encode())
        hash_tensor(h, t)
    return h.hexdigest()


@dataclass
class KeyScan:
    """What the validation pass learns from one tensor of all models."""

    key: str
    differs: bool
    base_sq: float = 0.0
    gram: torch.Tensor | None = None  # (M, M) float64 of the raw task vectors, when asked for
    digests: tuple[str, ...] = ()  # hash of the key's bytes in the base, then in each task model
    delta_sq: torch.Tensor | None = None  # (M,) float64: each task vector's squared norm on the key


def scan_key(tasks: TaskSet | TaskSetSpec, input_hash: str, observers: Sequence[PassObserver], grams: bool,
             key: str) -> KeyScan:
    """Finite values, whether any model differs from the base, the task vectors' squared norms
    (and with `grams`, the key's Gram matrix), and the `input_hash` of its bytes in every model
    (what a resumed job is keyed on); `observers` see every chunk's task vectors."""
    ts = as_taskset(tasks)
    m = ts.num_tasks
    hashers = [new_hasher(input_hash) for _ in range(m + 1)]  # base, then the tasks
    if not ts.meta[key].dtype.is_floating_point:
        differs = False
        for chunk in ts.chunks(key):
            b = ts.read_base(chunk)
            hash_tensor(hashers[0], b)
            for t in range(m):
                x = ts.read_task(t, chunk)
                hash_tensor(hashers[t + 1], x)
                differs |= not torch.equal(x, b)
        return KeyScan(key, differs, digests=tuple(h.hexdigest() for h in hashers))
    gram = torch.zeros(m, m, dtype=torch.float64) if grams else None
    delta_sq, d_sq = torch.zeros(m, dtype=torch.float64), torch.empty(m, dtype=ts.compute_dtype)
    base_sq, differs = 0.0, False
    for chunk in ts.chunks(key):
        shape = rows_shape(ts.meta[key].shape, chunk.rows)
        b, bf = ts.read_base32(chunk)
        hash_tensor(hashers[0], b)
        sq = float(torch.dot(bf.view(-1), bf.view(-1)))
        if not math.isfinite(sq):  # NaN/Inf in the base (or finite values whose squares overflow)
            _check_finite(b, ts.base, key)
        base_sq += sq
        d = ts.deltas(chunk, base32=bf, out=scratch(DELTAS, (m, *shape), ts.compute_dtype),
                      hashers=hashers[1:]).view(m, -1)
        if grams:
            g = d @ d.T
            gram += g.double()
            d_sq.copy_(g.diagonal())
        else:  # 8 dot products are ~5x cheaper than the (M, M) product (MKL, AVX2)
            for t in range(m):
                torch.dot(d[t], d[t], out=d_sq[t])
        if not bool(torch.isfinite(d_sq).all()):  # rare: find the culprit exactly
            for t, src in enumerate(ts.sources):
                _check_finite(ts.read_task(t, chunk), src, key)
        delta_sq += d_sq.double()
        for obs in observers:
            obs.see(chunk, bf, d.view(m, *shape))
        if not differs:  # a zero norm can hide tiny differences (fp32 underflow): compare exactly
            differs = bool((d_sq > 0).any()) or any(not torch.equal(ts.read_task(t, chunk), b) for t in range(m))
    return KeyScan(key, differs, base_sq, gram, tuple(h.hexdigest() for h in hashers), delta_sq)


def hash_tensor(hasher, t: torch.Tensor) -> None:
    """Feed a tensor's raw bytes (any dtype, bf16 included) to a hashlib object, without a copy."""
    if t.numel():
        hasher.update(memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()))


def content_digests(scans: Mapping[str, KeyScan], meta: Mapping[str, TensorMeta], num_models: int,
                    input_hash: str = DEFAULT_INPUT_HASH) -> list[str]:
    """Per model (base first): a hash over its keys' names, dtypes, shapes and bytes, in key order."""
    out = []
    for i in range(num_models):
        h = new_hasher(input_hash)
        for k, mt in meta.items():
            h.update(f"{k}\0{mt.dtype}\0{list(mt.shape)}\0{scans[k].digests[i]}\n".encode())
        out.append(h.hexdigest())
    return out


def _scan_values(
    base: CheckpointSource,
    sources: list[CheckpointSource],
    names: list[str],
    meta: dict[str, TensorMeta],
    specific: dict[str, dict[str, TensorMeta]],
    max_relative_change: float,
    executor=None,
    input_hash: str = DEFAULT_INPUT_HASH,
    observers: Sequence[PassObserver] = (),
    grams: bool = True,
    base_may_be_a_task: bool = False,
    freeze_equal: bool = True,
) -> tuple[list[str], list[str], dict[str, torch.Tensor], list[str]]:
    """One streaming pass: finite values, frozen keys, no task equal to the base, a plausible base,
    and each model's content hash (base first).

    With `grams`, the same pass accumulates each key's (M, M) Gram matrix of raw task vectors, so
    planning without preprocessing needs no second read of the inputs.
    """
    probe = TaskSet(names, base, sources, meta, list(meta), [], specific=specific)
    ex = get_executor(executor)
    scans = {s.key: s for s in ex.map(scan_key, list(meta), for_executor(probe, ex), input_hash, observers,
                                      grams, desc="validating checkpoints")}
    digests = content_digests(scans, meta, len(sources) + 1, input_hash)
    release()
    m = len(sources)
    base_sq = sum(s.base_sq for s in scans.values())
    delta_sq = [sum(float(s.delta_sq[t]) for s in scans.values() if s.delta_sq is not None) for t in range(m)]
    for t in range(m):
        identical = not base_may_be_a_task and delta_sq[t] == 0 and all(
            torch.equal(probe.read_task(t, c), probe.read_base(c)) for k in meta for c in probe.chunks(k))
        if identical:
            raise CheckpointError(
                f"task {names[t]!r} ({sources[t].path}) is identical to the base {base.path}: "
                "nothing was fine-tuned, or the wrong file was given"
            )
        ratio = (delta_sq[t] / base_sq) ** 0.5 if base_sq > 0 else float("inf")
        if ratio > max_relative_change:
            raise CheckpointError(
                f"task {names[t]!r} ({sources[t].path}) differs from the base {base.path} by "
                f"{ratio:.0%} of the base's norm (limit {max_relative_change:.0%}): the base does not "
                "look like the model it was fine-tuned from (raise max_relative_change / "
                "--max-relative-change if this is intended)"
            )
    for k in meta:
        if scans[k].differs and not meta[k].dtype.is_floating_point:
            raise CheckpointError(f"key {k!r} ({meta[k].dtype}) differs between models but is not floating point")
    merged = {k for k in meta if scans[k].differs or (not freeze_equal and meta[k].dtype.is_floating_point)}
    mergeable = [k for k in meta if k in merged]
    frozen = [k for k in meta if k not in merged]
    return mergeable, frozen, {k: scans[k].gram for k in mergeable if scans[k].gram is not None}, digests


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in `t`. min and max propagate NaN and are ±Inf when any entry is, so their
    finiteness is exact; one fused reduction is ~40x faster than isfinite(t).all(), which writes a
    bool tensor of t's size."""
    if not t.dtype.is_floating_point or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _check_finite(t: torch.Tensor, src: CheckpointSource, key: str) -> None:
    if not all_finite(t):
        raise CheckpointError(f"{src.path}: key {key!r} holds NaN or Inf values")
