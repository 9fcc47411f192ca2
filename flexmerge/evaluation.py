"""Evaluators for your own models, for `flexmerge sweep --base ... --model ...`.

An evaluator is `(task, state_dict) -> score`, higher is better; the sweep calls it on the
fine-tuned models once (the reference) and on every merged point. Two ways to get one:

* `load_evaluator("package.module:function")`: your own code (imported like any module; the
  current directory is searched first, as `python -m` would).
* `TextClassificationEvaluator(tasks, {"task": "dev.jsonl"})`: accuracy of Hugging Face
  `*ForSequenceClassification` fine-tunes on labelled text (JSONL or CSV with `text` and
  `label` columns; labels as ids or as the names in the task's `id2label`), with the task's own
  config and tokenizer, in batches.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from flexmerge.errors import ConfigError, FlexMergeError
from flexmerge.flexmodel.materialize import collect_hf_files
from flexmerge.runtime.hf_dir import unpack_hf_files

Evaluator = Callable[[str, dict[str, torch.Tensor]], float]
DATA_MAX_BYTES = 256 << 20


def load_evaluator(spec: str) -> Evaluator:
    """The function named by `package.module:function`."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--evaluator {spec!r} must be package.module:function")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"--evaluator {spec!r}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"--evaluator {spec!r}: {module_name!r} has no function {attr!r}")
    return _checked(fn, spec)


def _checked(fn: Callable, name: str) -> Evaluator:
    """Scores must be finite numbers: a NaN would silently poison every average."""
    def evaluate(task: str, state: dict[str, torch.Tensor]) -> float:
        score = fn(task, state)
        try:
            value = float(score)
        except (TypeError, ValueError):
            raise FlexMergeError(f"evaluator {name} returned {score!r} for task {task!r}, not a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise FlexMergeError(f"evaluator {name} returned {value} for task {task!r}")
        return value
    return evaluate


def read_examples(path: str | Path, limit: int | None = None) -> list[tuple[str, Any]]:
    """(text, label) pairs from a JSONL (`.jsonl`, `.json`: one object per line) or CSV file with
    `text` and `label` columns; the first `limit` of them."""
    return read_text_pairs(path, "label", limit)


def read_text_pairs(path: str | Path, field: str, limit: int | None = None,
                    what: str = "evaluation data") -> list[tuple[str, Any]]:
    """(text, row[field]) pairs from a JSONL (one object per line) or CSV file (a header naming
    `text` and `field`), the first `limit` of them: labelled examples (`field="label"`), or the
    (input, task) examples a router learns from (`field="task"`). Every error names file and row."""
    path = Path(path)
    try:
        if path.stat().st_size > DATA_MAX_BYTES:
            raise ConfigError(f"{path}: larger than {DATA_MAX_BYTES >> 20} MiB; pass a smaller file")
        raw = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path}: not UTF-8 text") from None
    rows = _csv_rows(raw, path, field) if path.suffix.lower() == ".csv" else _jsonl_rows(raw, path, field)
    out = []
    for n, row in rows:
        if "text" not in row or field not in row:
            raise ConfigError(f"{path}: row {n} has no 'text' and '{field}' (it has {sorted(row)[:6]})")
        if not isinstance(row["text"], str):
            raise ConfigError(f"{path}: row {n}: 'text' must be a string")
        out.append((row["text"], row[field]))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ConfigError(f"{path}: no examples")
    return out


def _jsonl_rows(raw: str, path: Path, field: str):
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            raise ConfigError(f"{path}: line {n} is not JSON (JSONL: one object per line)") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}: line {n} is not a JSON object with 'text' and '{field}'")
        yield n, row


def _csv_rows(raw: str, path: Path, field: str):
    reader = csv.DictReader(io.StringIO(raw))
    if not reader.fieldnames or not {"text", field} <= set(reader.fieldnames):
        raise ConfigError(f"{path}: a CSV file needs a header with 'text' and '{field}' columns")
    for n, row in enumerate(reader, 2):
        yield n, row


class TextClassificationEvaluator:
    """Accuracy of each task's sequence-classification model on its labelled examples.

    The task's config and tokenizer are the ones its artifact would carry (the fine-tune's
    directory, or for a PEFT adapter its directory and then the base's). Inputs are tokenized
    once per task; each call builds nothing but loads the given weights into the task's model."""

    def __init__(self, tasks, data: Mapping[str, str | Path], limit: int | None = 1000, batch_size: int = 32,
                 max_length: int | None = None):
        missing = [t for t in tasks.names if t not in data]
        unknown = [t for t in data if t not in tasks.names]
        if unknown:
            raise ConfigError(f"--eval-data names task {unknown[0]!r}, which is not one of: {', '.join(tasks.names)}")
        if missing:
            raise ConfigError(f"--eval-data gives no file for task {missing[0]!r}: every task needs one")
        if batch_size < 1 or (limit is not None and limit < 1):
            raise ConfigError("--eval-batch-size and --eval-limit must be at least 1")
        self.batch_size = batch_size
        self._scratch = tempfile.TemporaryDirectory(prefix="flexmerge-eval-")
        files = collect_hf_files(tasks)
        self._models: dict[str, torch.nn.Module] = {}
        self._batches: dict[str, list[tuple[dict[str, torch.Tensor], torch.Tensor]]] = {}
        for task in tasks.names:
            directory = self._hf_dir(task, files.get(task, {}))
            examples = read_examples(data[task], limit)
            self._models[task], labels = _model_and_labels(directory, task, examples, data[task])
            self._batches[task] = _tokenized(directory, [x for x, _ in examples], labels, batch_size, max_length)

    def __call__(self, task: str, state: dict[str, torch.Tensor]) -> float:
        model = self._models[task]
        _load_weights(model, state, task)
        correct = total = 0
        with torch.inference_mode():
            for batch, labels in self._batches[task]:
                predicted = model(**batch).logits.argmax(-1)
                correct += int((predicted == labels).sum())
                total += len(labels)
        return correct / total

    def _hf_dir(self, task: str, files: dict[str, bytes]) -> Path:
        if "config.json" not in files:
            raise ConfigError(f"task {task!r}: --eval-data needs Hugging Face inputs (a config.json and a "
                              "tokenizer in the model's directory); give --evaluator for other models")
        return unpack_hf_files(files, self._scratch.name, task)


def _model_and_labels(directory: Path, task: str, examples, source) -> tuple[torch.nn.Module, torch.Tensor]:
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory)
    arch = (config.architectures or [""])[0]
    if not arch.endswith("ForSequenceClassification") or not hasattr(transformers, arch):
        raise ConfigError(f"task {task!r}: --eval-data evaluates *ForSequenceClassification models; this one is "
                          f"{arch or 'of no stated architecture'} (give --evaluator instead)")
    names = {str(v): int(k) for k, v in config.id2label.items()}
    ids = []
    for text, label in examples:
        if isinstance(label, bool):
            label = int(label)
        if isinstance(label, str) and label.strip().lstrip("-").isdigit() and label not in names:
            label = int(label)
        if isinstance(label, int) and 0 <= label < config.num_labels:
            ids.append(label)
        elif isinstance(label, str) and label in names:
            ids.append(names[label])
        else:
            raise ConfigError(f"{source}: label {label!r} is neither an id below {config.num_labels} nor one of "
                              f"task {task!r}'s labels ({', '.join(list(names)[:8])})")
    return getattr(transformers, arch)(config).eval(), torch.tensor(ids)


def _tokenized(directory: Path, texts: list[str], labels: torch.Tensor, batch_size: int, max_length: int | None):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
        out.append((dict(batch), labels[start:start + batch_size]))
    return out


def _load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], task: str) -> None:
    result = model.load_state_dict(state, strict=False)
    params = {n for n, _ in model.named_parameters()}
    missing = [k for k in result.missing_keys if k in params]
    if missing or result.unexpected_keys:
        raise FlexMergeError(f"task {task!r}: the weights do not fit its model (missing {missing[:3]}, "
                             f"unexpected {result.unexpected_keys[:3]})")
