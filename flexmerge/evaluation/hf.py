"""What the evaluators of Hugging Face models share: one data file per task, each task's side files
(config, tokenizer, chat template: those its artifact would carry) written out as a folder that
`from_pretrained` reads, the model's kind by its architecture, the model built once, and the
weights of each call loaded into it."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from flexmerge.errors import ConfigError, FlexMergeError
from flexmerge.flexmodel.materialize import collect_hf_files
from flexmerge.runtime.hf_dir import unpack_hf_files
from flexmerge.taskvec import TaskSet

CLASSIFIER = "ForSequenceClassification"
CAUSAL_LM = "ForCausalLM"
KIND_NAMES = {CLASSIFIER: "a sequence classifier", CAUSAL_LM: "a causal LM"}


def check_data_names(tasks: TaskSet, data: Mapping[str, str | Path]) -> None:
    """Every task has exactly one file, and every file names a task."""
    unknown = [t for t in data if t not in tasks.names]
    if unknown:
        raise ConfigError(f"--eval-data names task {unknown[0]!r}, which is not one of: {', '.join(tasks.names)}")
    missing = [t for t in tasks.names if t not in data]
    if missing:
        raise ConfigError(f"--eval-data gives no file for task {missing[0]!r}: every task needs one")


def check_counts(limit: int | None, batch_size: int) -> None:
    if batch_size < 1 or (limit is not None and limit < 1):
        raise ConfigError("--eval-batch-size and --eval-limit must be at least 1")


def task_side_files(tasks: TaskSet) -> dict[str, dict[str, bytes]]:
    """Per task, the Hugging Face side files its artifact would carry; a config.json is required."""
    files = collect_hf_files(tasks)
    for task in tasks.names:
        if "config.json" not in files.get(task, {}):
            raise ConfigError(f"task {task!r}: --eval-data needs Hugging Face inputs (a config.json and a "
                              "tokenizer in the model's directory); give --evaluator for other models")
    return files


def architecture(files: Mapping[str, bytes], task: str) -> str:
    """The first of the config's `architectures` ('' when it states none)."""
    try:
        config = json.loads(files["config.json"])
    except (ValueError, RecursionError):
        raise ConfigError(f"task {task!r}: its config.json is not JSON") from None
    names = config.get("architectures") if isinstance(config, dict) else None
    return names[0] if isinstance(names, list) and names and isinstance(names[0], str) else ""


def model_kind(arch: str, task: str) -> str:
    """CLASSIFIER or CAUSAL_LM: the kinds of model `--eval-data` evaluates."""
    import transformers

    for kind in (CLASSIFIER, CAUSAL_LM):
        if arch.endswith(kind) and hasattr(transformers, arch):
            return kind
    raise ConfigError(f"task {task!r}: --eval-data evaluates *{CLASSIFIER} and *{CAUSAL_LM} models; this one is "
                      f"{arch or 'of no stated architecture'} (give --evaluator instead)")


def describe(kind: str, arch: str, task: str) -> str:
    """`task 'x' is a causal LM (LlamaForCausalLM)`: what a row-format error adds."""
    return f"task {task!r} is {KIND_NAMES[kind]} ({arch})"


class TaskDirs:
    """The tasks' side files as folders in a scratch directory, removed with this object."""

    def __init__(self) -> None:
        self._scratch = tempfile.TemporaryDirectory(prefix="flexmerge-eval-")

    def unpack(self, task: str, files: Mapping[str, bytes]) -> Path:
        return unpack_hf_files(files, self._scratch.name, task)


def require_kind(files: Mapping[str, bytes], task: str, kind: str) -> str:
    """The task's architecture, which must be of `kind` (an evaluator built for another kind of model)."""
    arch = architecture(files, task)
    if model_kind(arch, task) != kind:
        raise ConfigError(f"task {task!r}: expected {KIND_NAMES[kind]} (*{kind}), this one is {arch}")
    return arch


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], task: str) -> None:
    """Load `state` into the task's model; buffers and tied copies may be absent, parameters may not."""
    result = model.load_state_dict(state, strict=False)
    params = {n for n, _ in model.named_parameters()}
    missing = [k for k in result.missing_keys if k in params]
    if missing or result.unexpected_keys:
        raise FlexMergeError(f"task {task!r}: the weights do not fit its model (missing {missing[:3]}, "
                             f"unexpected {result.unexpected_keys[:3]})")
