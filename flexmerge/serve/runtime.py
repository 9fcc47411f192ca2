"""One process that answers every task of one artifact: per-task modules that share the stored tensors,
and mixed-task batches that run as one forward pass.

Memory: the artifact is loaded once; `module(task)` loads the task's weights with `assign=True`, so
a block stored once (one group shared by several tasks) is one tensor in memory however many tasks
read it. Exceptions, by what is stored: a masked group (EMR, Consensus) is rebuilt per task
(θ0 + mask ⊙ τ), so is a residual group (Twin-Merging: θ0 + shared + A·B), and a tensor split into
row groups (`split:K`) is concatenated per task. Inputs of unknown task are routed by a router
stored in the artifact (`route`, `predict_routed`; see `flexmerge.routing`).

Mixed batches: every module that holds parameters of its own is replaced, in one routing copy of
the model, by a `RoutedModule` that applies each *distinct* weight set to the rows of the tasks
that read it; a weight set shared by all tasks of the batch is one call on the whole batch.
Supported leaves are Linear, Embedding, LayerNorm, Conv1d/2d and GroupNorm (row-wise modules
whose first input dimension is the batch); a model with any other parameter-holding module falls
back to one forward pass per task. Heads whose outputs differ in width (2, 3, 5 labels) are
padded with -inf on the last dimension and cut back per row.

External heads: an encoder artifact (a merged `BertModel`, say) whose tasks each have a head of
their own outside the artifact (`heads=`, e.g. a Linear trained on mean-pooled features) is served
as text-classification: the encoder runs (one pass for a mixed batch), its last hidden state is
mean-pooled over non-padding tokens, and each task's head runs on the rows of that task.
`Runtime.from_suite("wordnet", size=2)` serves a suite's zoo that way.
"""

from __future__ import annotations

import re
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from flexmerge.errors import ConfigError, FlexMergeError
from flexmerge.flexmodel import FlexModel, load

ROW_WISE = (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm, torch.nn.Conv1d, torch.nn.Conv2d,
            torch.nn.GroupNorm)


class Router:
    """Where each task's rows are in the current batch, read by every RoutedModule.

    `predict_mixed` sorts a batch by the task order given here, so each task's rows are one
    contiguous span; a group whose tasks are adjacent in that order then reads and writes a
    slice of the batch (a view, no copy) and only the other groups gather their rows."""

    def __init__(self, order: Sequence[int]):
        self.position = {t: i for i, t in enumerate(order)}
        self.spans: dict[int, tuple[int, int]] = {}
        self.batch = 0
        self._plans: dict[tuple, list[tuple[int, slice | torch.Tensor]]] = {}

    def sort_key(self, task: int) -> int:
        return self.position[task]

    def set(self, row_tasks: Sequence[int]) -> None:
        """The batch's task per row, already sorted by `sort_key`."""
        self.spans = {}
        for row, t in enumerate(row_tasks):
            start, _ = self.spans.get(t, (row, row))
            self.spans[t] = (start, row + 1)
        self.batch = len(row_tasks)
        self._plans = {}

    def plan(self, members: tuple[tuple[int, ...], ...]) -> list[tuple[int, slice | torch.Tensor]]:
        """(group index, its rows) for the groups present in the batch: a slice when the group's
        rows are contiguous, else an index tensor. Computed once per batch and grouping."""
        if members not in self._plans:
            plan = []
            for i, tasks in enumerate(members):
                spans = sorted(self.spans[t] for t in tasks if t in self.spans)
                if not spans:
                    continue
                if all(a[1] == b[0] for a, b in zip(spans, spans[1:])):
                    plan.append((i, slice(spans[0][0], spans[-1][1])))
                else:
                    plan.append((i, torch.cat([torch.arange(a, b) for a, b in spans])))
            self._plans[members] = plan
        return self._plans[members]


class RoutedModule(torch.nn.Module):
    """Stands for one module of the model: `groups` are the distinct modules the tasks read."""

    def __init__(self, router: Router, groups: list[tuple[list[int], torch.nn.Module]]):
        super().__init__()
        self.router = router
        self.members = tuple(tuple(tasks) for tasks, _ in groups)
        self.choices = torch.nn.ModuleList([m for _, m in groups])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.router.plan(self.members)
        if len(plan) == 1:  # one weight set for every row of the batch: one call
            return self.choices[plan[0][0]](x)
        batch = self.router.batch
        per_row = x.shape[0] == batch  # else an input shared by every row (position ids)
        outputs = []
        for i, rows in plan:
            if not per_row:
                y = self.choices[i](x)
                n = rows.stop - rows.start if isinstance(rows, slice) else len(rows)
                outputs.append((rows, y.expand(n, *y.shape[1:])))
            else:
                outputs.append((rows, self.choices[i](x[rows] if isinstance(rows, slice) else x.index_select(0, rows))))
        return _scatter_rows(outputs, batch)


def _scatter_rows(parts: list[tuple[slice | torch.Tensor, torch.Tensor]], batch: int) -> torch.Tensor:
    """Rows back in batch order; outputs of different widths (heads of 2, 3, 5 labels) are padded
    with -inf on the last dim."""
    first = parts[0][1]
    widths = {y.shape[-1] for _, y in parts} if first.dim() > 1 else set()
    if len(widths) > 1:
        out = first.new_full((batch, *first.shape[1:-1], max(widths)), float("-inf"))
        for rows, y in parts:
            out[rows, ..., : y.shape[-1]] = y
        return out
    out = first.new_empty((batch, *first.shape[1:]))
    for rows, y in parts:
        if isinstance(rows, slice):
            out[rows] = y
        else:
            out.index_copy_(0, rows, y)
    return out


class Runtime:
    """Serve every task of one artifact from one process (see the module docstring)."""

    def __init__(self, flex: FlexModel, heads: dict[str, torch.nn.Module] | None = None,
                 labels: dict[str, list[str]] | None = None, hf_dir: str | Path | None = None,
                 max_length: int | None = None):
        """`heads`: per task, a module applied to the mean-pooled last hidden state of the task's
        encoder (the task is then text-classification, with `labels[task]` as its label names,
        default LABEL_0...). `hf_dir`: the config.json and tokenizer for tasks whose artifact holds
        no Hugging Face files (inputs given as plain safetensors). `max_length`: tokens kept per
        input (default: the tokenizer's maximum)."""
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
        self._dirs: dict[str, Path] = {}
        self._mixed: tuple[torch.nn.Module, Router] | None = None
        self._shared: torch.nn.Module | None = None  # the router's feature model (shared weights)
        self._info: dict[str, dict[str, Any]] = {}
        self._scratch: tempfile.TemporaryDirectory | None = None

    @classmethod
    def load(cls, path: str | Path, **options: Any) -> "Runtime":
        """The artifact at `path`; `options` as for Runtime (heads, labels, hf_dir, max_length)."""
        return cls(load(path), **options)

    @classmethod
    def from_suite(cls, suite: str | Any, size: float, method: str = "task_arithmetic",
                   cache_dir: str | Path | None = None, log=print) -> "Runtime":
        """A benchmark suite's zoo (built or reused) merged to `size` (the artifact cached, see
        `suite_artifact`), served with the suite's heads and label names."""
        from flexmerge.suites import get_suite

        suite = get_suite(suite) if isinstance(suite, str) else suite
        path, zoo = suite_artifact(suite, size, method, cache_dir, log)
        return cls.load(path, **suite.serve_options(zoo))

    @property
    def tasks(self) -> list[str]:
        return list(self.flex.tasks)

    @property
    def size(self) -> float:
        return float(self.flex.size)

    def task_info(self, task: str) -> dict[str, Any]:
        """{"task", "kind": text-classification | feature-extraction, "labels"} from the task's head
        (text-classification) or else its config."""
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
        for task, _ in items:
            self._check(task)
        texts = [x for _, x in items]
        tasks = [t for t, _ in items]
        mixed = self._mixed_model()
        if mixed is None:
            return self._per_task(tasks, texts)
        model, router = mixed
        index = {t: i for i, t in enumerate(self.flex.tasks)}
        order = sorted(range(len(items)), key=lambda i: router.sort_key(index[tasks[i]]))  # stable
        tasks, texts = [tasks[i] for i in order], [texts[i] for i in order]
        enc = self._encode(tasks[0], texts)
        with self._lock, torch.inference_mode():
            router.set([index[t] for t in tasks])
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
        from flexmerge.routing import fit_router

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
        from flexmerge.routing import route_weights

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
        state = {**self.flex.mixture_state_dict(weights), **self.flex.specific.get(task, {})}
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
            directory = Path(self._scratch.name) / task
            directory.mkdir()
            for name, data in files.items():
                (directory / name).write_bytes(data)
            self._dirs[task] = directory
        return self._dirs[task]

    def _config(self, task: str):
        import transformers

        self._check(task)
        return transformers.AutoConfig.from_pretrained(self._hf_dir(task))

    def _hf_model(self, task: str) -> torch.nn.Module:
        import transformers

        config = self._config(task)
        arch = (config.architectures or ["AutoModel"])[0]
        cls = getattr(transformers, arch, None)
        if cls is None:
            raise FlexMergeError(f"task {task!r}: transformers has no architecture {arch!r}")
        return cls(config)

    def _tokenizer(self, task: str):
        import transformers

        if task not in self._tokenizers:
            self._tokenizers[task] = transformers.AutoTokenizer.from_pretrained(self._hf_dir(task))
        return self._tokenizers[task]

    def _encode(self, task: str, texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(self._tokenizer(task)(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                          return_tensors="pt"))

    def _mixed_model(self) -> tuple[torch.nn.Module, Router] | None:
        """The routing copy of the model, or None when a mixed batch must run per task (a module
        that is not row-wise, or tasks whose tokenizers or architectures differ)."""
        if self._mixed is not None:
            return self._mixed
        modules = [self.module(t) for t in self.flex.tasks]
        if len({type(m) for m in modules}) > 1 or len({_tokenizer_files(self.flex, t) for t in self.flex.tasks}) > 1:
            return None
        names = [n for n, m in modules[0].named_modules() if list(m.parameters(recurse=False))]
        per_task = [dict(m.named_modules()) for m in modules]
        if not all(isinstance(per_task[0][n], ROW_WISE) for n in names):
            return None
        groups = {name: _distinct([p[name] for p in per_task]) for name in names}
        weights = {name: sum(p.numel() for p in per_task[0][name].parameters(recurse=False)) for name in names}
        router = Router(task_order(groups, weights, len(modules)))
        routed = self._hf_model(self.flex.tasks[0]).eval()
        for name in names:
            _replace(routed, name, RoutedModule(router, groups[name]))
        self._mixed = (routed, router)
        release_freed_memory()  # the random weights transformers built before the artifact's replaced them
        return self._mixed


def task_order(groups: dict[str, list[tuple[list[int], Any]]], weights: dict[str, int], m: int) -> list[int]:
    """An order of the m tasks in which the groups of as many weights as possible are contiguous
    (read as slices of a batch sorted this way): tasks sorted by their group in each distinct
    grouping, the groupings that cover the most weights first (those are contiguous for sure)."""
    covered: dict[tuple, int] = {}
    for name, gs in groups.items():
        if len(gs) > 1:
            key = tuple(sorted(tuple(tasks) for tasks, _ in gs))
            covered[key] = covered.get(key, 0) + weights[name]
    partitions = sorted(covered, key=lambda k: -covered[k])

    def signature(task: int) -> tuple[int, ...]:
        return tuple(next(g for g, tasks in enumerate(p) if task in tasks) for p in partitions)

    return sorted(range(m), key=signature)


def release_freed_memory() -> None:
    """Hand memory that Python and torch have freed back to the OS (glibc's `malloc_trim`), so
    resident memory reflects what the runtime holds: building a model with random weights that
    the artifact's then replace leaves ~150 MiB of freed pages that glibc would otherwise keep.
    A no-op where glibc is not the allocator."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is not None:
        trim(0)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of `hidden` over the non-padding tokens (dim -2): a batch [B, L, H] or one row
    [L, H]. The same features the wordnet suite trains its heads on (`WordNetSuite.pooled`)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(-2) / mask.sum(-2).clamp_min(1)


def suite_artifact(suite: Any, size: float, method: str = "task_arithmetic", cache_dir: str | Path | None = None,
                   log=print) -> tuple[Path, Any]:
    """(artifact, zoo): the suite's zoo (built or reused) merged to `size` with `method`, cached as
    `<cache>/served/<zoo>-<method>-<size>x` and reused when present; `method` may carry its
    parameters (`twin:rank=7`, as in `flexmerge sweep --methods`). Only suites that take text
    (`suite.serving_reason()` is None) are served."""
    from flexmerge.api import merge_to_disk
    from flexmerge.flexmodel.read import is_artifact
    from flexmerge.methods import get_method
    from flexmerge.suites import default_cache_dir, get_zoo
    from flexmerge.taskvec import load_tasks

    reason = suite.serving_reason()
    if reason:
        raise ConfigError(reason)
    get_method(method)  # 'twin:rank=7' (a method with its parameters): a typo fails now, not after the zoo
    zoo = get_zoo(suite, Path(cache_dir) if cache_dir else None, log=log)
    name_of_entry = f"{zoo.directory.name}-{_cache_label(method)}-{float(size):g}x"
    out = Path(cache_dir or default_cache_dir()) / "served" / name_of_entry
    if not is_artifact(out):
        log(f"merging the {suite.name!r} zoo to {float(size):g}x with {method} into {out} (cached for later runs)")
        merge_to_disk(load_tasks(zoo.base, zoo.models, **suite.load_options()), out, size=size, method=method)
    return out, zoo


def _cache_label(method: str) -> str:
    """A method spec as part of a directory name: 'twin:rank=7' -> 'twin_rank=7' (only [A-Za-z0-9._=-])."""
    return re.sub(r"[^A-Za-z0-9._=-]", "_", method)[:100]


def _kind(config) -> str:
    arch = (config.architectures or [""])[0]
    return "text-classification" if arch.endswith("ForSequenceClassification") else "feature-extraction"


def _tokenizer_files(flex: FlexModel, task: str) -> tuple:
    files = flex.hf_files.get(task, {})
    return tuple(sorted((n, d) for n, d in files.items() if n != "config.json"))


def _distinct(modules: list[torch.nn.Module]) -> list[tuple[list[int], torch.nn.Module]]:
    """Tasks grouped by the weights their module holds (the same stored tensors -> one group)."""
    groups: dict[tuple, tuple[list[int], torch.nn.Module]] = {}
    for t, m in enumerate(modules):
        ident = tuple((p.data_ptr(), tuple(p.shape)) for p in m.parameters(recurse=False))
        groups.setdefault(ident, ([], m))[0].append(t)
    return list(groups.values())


def _replace(root: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
