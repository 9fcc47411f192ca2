"""What a benchmark suite is, and the on-disk cache of the model zoos suites build.

A suite is a recipe on top of the library: it owns a base model, M tasks with train/val/test
splits, the fine-tuning that produces one checkpoint (+ head) per task, and an evaluator.
Its zoo is cached under `cache_dir/<suite>-<config hash>/`, written atomically and verified
by checksum (every file it holds) before reuse; an entry that fails verification is rebuilt,
never reused. A suite may start from other suites' zoos (`Suite.requires`: a pretrained base
that two zoos share), which are got or built first, in the same cache.
"""

from __future__ import annotations

import hashlib
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from flexmerge._atomic import atomic_directory
from flexmerge.errors import ConfigError, FlexMergeError, UnknownNameError
from flexmerge.flexmodel.format import sha256_file
from flexmerge.paths import inside
from flexmerge.planning.activations import Calibration
from flexmerge.suites.training import accuracy

Evaluator = Callable[[str, dict[str, torch.Tensor]], float]
ZOO_MANIFEST = "zoo.json"
CALIBRATION_EXAMPLES = 64
SPLITS = ("train", "val", "test")


def default_cache_dir() -> Path:
    import os

    if os.environ.get("FLEXMERGE_CACHE"):
        return Path(os.environ["FLEXMERGE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flexmerge"


def default_layout(tasks: Sequence[str]) -> dict[str, Any]:
    """Where a zoo keeps its checkpoints, relative to its directory: base.safetensors and models/<task>.safetensors."""
    return {"base": "base.safetensors", "models": {t: f"models/{t}.safetensors" for t in tasks}}


@dataclass
class Zoo:
    """A built suite: base checkpoint, one checkpoint and one head per task, and build facts.
    `layout` (the suite's `layout()`, kept in the manifest) says where the checkpoints are: files,
    or Hugging Face model and PEFT adapter directories."""

    suite: str
    directory: Path
    tasks: list[str]
    info: dict[str, Any] = field(default_factory=dict)
    layout: dict[str, Any] = field(default_factory=dict)

    @property
    def base(self) -> Path:
        return inside(self.directory, self.layout.get("base", "base.safetensors"), "zoo base")

    @property
    def models(self) -> dict[str, Path]:
        paths = self.layout.get("models") or default_layout(self.tasks)["models"]
        return {t: inside(self.directory, paths[t], "zoo model") for t in self.tasks}

    def head(self, task: str) -> Path:
        return self.directory / "heads" / f"{task}.safetensors"

    def heads(self) -> dict[str, torch.nn.Linear]:
        """Each task's linear head, shaped by its stored weight (heads are never merged)."""
        out = {}
        for task in self.tasks:
            sd = load_file(self.head(task))
            out[task] = torch.nn.Linear(sd["weight"].shape[1], sd["weight"].shape[0])
            out[task].load_state_dict(sd)
        return out


class Suite(ABC):
    name: str
    description: str
    score_name = "accuracy"  # what the evaluator measures
    base_name = "base encoder + trained head"  # what `base_scores` scores

    @abstractmethod
    def task_names(self) -> list[str]: ...

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Everything that determines the zoo; its hash names the cache entry."""

    @abstractmethod
    def build(self, directory: Path) -> dict[str, Any]:
        """Write base.safetensors, models/<task>.safetensors and heads/<task>.safetensors (or what
        `layout()` names); return facts (per-task fine-tuned and base-with-head test accuracy,
        timings). A suite that `requires()` other suites takes their zoos as a second argument,
        `build(directory, required)`, in the order it names them."""

    def requires(self) -> list[Suite]:
        """Suites whose zoos this suite's build starts from (a pretrained base two zoos share);
        `get_zoo` gets or builds them first, in the same cache."""
        return []

    def layout(self) -> dict[str, Any]:
        """Where its zoo keeps the base and each task's checkpoint, relative to the zoo's directory:
        {"base": path, "models": {task: path}}."""
        return default_layout(self.task_names())

    def base_scores(self, zoo: Zoo) -> dict[str, float] | None:
        """Per task, what the base model (with a head trained on the task, for a classifier) scores:
        the sweep's reference below the curves."""
        return zoo.info.get("base_with_head")

    @abstractmethod
    def evaluator(self, zoo: Zoo, split: str = "test") -> Evaluator:
        """(task, full state dict of the encoder) -> accuracy on the task's `split` ("test"; "val" to
        tune settings without looking at test)."""

    def calibration(self, zoo: Zoo, per_task: int = CALIBRATION_EXAMPLES) -> Calibration:
        """Up to `per_task` UNLABELLED inputs of each task's validation split and how to run the
        encoder on them: what a data-aware planner (`flexmerge.planning.DATA_PLANNERS`) reads."""
        raise FlexMergeError(f"suite {self.name!r} provides no calibration inputs, so data-aware planners "
                             "cannot run on it")

    def validation_inputs(self, tasks: Sequence[str] = ()) -> torch.Tensor:
        """Every validation input of `tasks` (those the suite has; none of them: of all its tasks) as
        one batch, labels dropped: calibration for a merge that runs the models (`flexmerge pleas`)."""
        raise ConfigError(f"suite {self.name!r} has no tensor inputs to calibrate on; give a safetensors file")

    def unavailable_reason(self) -> str | None:
        """None when the suite can run here, else why not (missing data or weights)."""
        return None

    def load_options(self) -> dict[str, Any]:
        """Options for `flexmerge.load_tasks` on this suite's zoo."""
        return {}

    def serving_reason(self) -> str | None:
        """None when `flexmerge serve --suite` can serve this suite (its tasks take text), else why not."""
        return (f"suite {self.name!r} is not a text suite: its models take no text, so they cannot be served "
                "or routed over text; the text suites are wordnet, wordnet20 and wordnet30")

    def serve_options(self, zoo: Zoo) -> dict[str, Any]:
        """`flexmerge.serve.Runtime` options (heads, labels, hf_dir, max_length) serving the zoo's
        merged encoders; only for suites whose `serving_reason()` is None."""
        raise FlexMergeError(self.serving_reason() or f"suite {self.name!r} defines no serve options")

    def split_texts(self, split: str) -> dict[str, tuple[list[str], list[int]]]:
        """Per task, the texts and label indices of its `split` ("val" or "test"); only for suites
        whose `serving_reason()` is None (their tasks take text)."""
        raise ConfigError(self.serving_reason() or f"suite {self.name!r} defines no labelled texts")

    def labelled_texts(self, split: str, per_task: int | None = None) -> list[tuple[str, str, int]]:
        """(text, task, label) of every task's `split`, task by task; `per_task`: that many of each
        task, evenly spaced over its split (the splits are ordered by class, so every class keeps
        its share)."""
        if per_task is not None and per_task < 1:
            raise ConfigError(f"per-task count must be at least 1, got {per_task}")
        out: list[tuple[str, str, int]] = []
        for task, (texts, labels) in self.split_texts(split).items():
            n = len(texts)
            if per_task is not None and per_task > n:
                raise ConfigError(f"task {task!r} has {n} {split} examples, fewer than the {per_task} asked per task")
            rows = range(n) if per_task is None else [i * n // per_task for i in range(per_task)]
            out += [(texts[i], task, int(labels[i])) for i in rows]
        return out

    def router_calibration(self, per_task: int | None = None) -> list[tuple[str, str]]:
        """(text, task) pairs of the tasks' validation splits: the calibration data a router
        (`flexmerge route train --suite`, `sweep --routed`) learns from, never the test split."""
        return [(x, t) for x, t, _ in self.labelled_texts("val", per_task)]


class TensorSuite(Suite):
    """A suite whose task inputs are tensors, `data()["tasks"][task][split] = (inputs, labels)`, read by
    one encoder (`network()`) and one linear head per task: evaluation and the planners'
    calibration inputs are the same for every such suite (digits, fashion)."""

    @abstractmethod
    def data(self) -> dict[str, Any]: ...

    @abstractmethod
    def network(self) -> torch.nn.Module:
        """A fresh encoder of the suite's architecture (weights are loaded into it)."""

    def evaluator(self, zoo: Zoo, split: str = "test") -> Evaluator:
        """Accuracy on the task's `split` ("test" for reports; "val" to tune the suite or a planner)."""
        check_split(split)
        data, heads = self.data(), zoo.heads()
        model = self.network().eval()

        def evaluate(task: str, state_dict: dict[str, torch.Tensor]) -> float:
            model.load_state_dict(state_dict)
            xs, ys = data["tasks"][task][split]
            return accuracy(lambda i: heads[task](model(xs[i])), ys)

        return evaluate

    def calibration(self, zoo: Zoo, per_task: int = CALIBRATION_EXAMPLES) -> Calibration:
        """The first `per_task` validation inputs of each task (its own view), labels dropped."""
        data = self.data()
        inputs = {t: data["tasks"][t]["val"][0][:per_task] for t in zoo.tasks}
        return Calibration(self.network(), inputs, lambda model, x: model(x))

    def validation_inputs(self, tasks: Sequence[str] = ()) -> torch.Tensor:
        """The validation inputs of `tasks` that are this suite's (none: of all its tasks), concatenated."""
        split = self.data()["tasks"]
        chosen = [t for t in tasks if t in split] or list(split)
        return torch.cat([split[t]["val"][0] for t in chosen])


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise UnknownNameError("split", split, SPLITS)
    return split


def config_hash(suite: Suite) -> str:
    blob = json.dumps({"suite": suite.name, **suite.config()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _is_cache_dir(path: Path) -> bool:
    """A (possibly damaged) zoo directory of the cache: ours to rebuild."""
    return path.is_dir() and not path.is_symlink()


def get_zoo(suite: Suite, cache_dir: Path | None = None, rebuild: bool = False, log=print) -> Zoo:
    """The suite's zoo from the cache if it verifies, else built (atomically) and cached."""
    reason = suite.unavailable_reason()
    if reason:
        raise FlexMergeError(f"suite {suite.name!r} cannot run here: {reason}")
    required = [get_zoo(r, cache_dir, log=log) for r in suite.requires()]
    directory = Path(cache_dir or default_cache_dir()) / f"{suite.name}-{config_hash(suite)}"
    if directory.exists() and not rebuild:
        problem = verify_zoo(directory)
        if problem is None:
            return _read_zoo(directory)
        log(f"cached zoo {directory} is unusable ({problem}); rebuilding it")
    log(f"building the {suite.name!r} zoo in {directory} (cached for later runs)")
    with atomic_directory(directory, overwrite=True, replaceable=_is_cache_dir, what="a cached zoo") as tmp:
        for sub in ("models", "heads"):
            (tmp / sub).mkdir()
        t0 = time.perf_counter()
        info = suite.build(tmp, required) if required else suite.build(tmp)
        info["build_seconds"] = time.perf_counter() - t0
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "suite": suite.name, "tasks": suite.task_names(), "config": suite.config(), "info": info,
            "layout": suite.layout(), "requires": [z.directory.name for z in required],
            "files": {str(p.relative_to(tmp)): sha256_file(p) for p in files},
        }
        (tmp / ZOO_MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    return _read_zoo(directory)


def verify_zoo(directory: Path) -> str | None:
    mf = directory / ZOO_MANIFEST
    if not mf.is_file():
        return "no zoo.json"
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError:
        return "zoo.json is corrupted"
    for rel, digest in manifest.get("files", {}).items():
        f = directory / rel
        if not f.is_file():
            return f"{rel} is missing"
        if sha256_file(f) != digest:
            return f"{rel} fails its checksum"
    return None


def _read_zoo(directory: Path) -> Zoo:
    manifest = json.loads((directory / ZOO_MANIFEST).read_text())
    return Zoo(manifest["suite"], directory, manifest["tasks"], manifest["info"], manifest.get("layout") or {})
