"""Accuracy of Hugging Face `*ForSequenceClassification` fine-tunes on labelled text (`text` and
`label`; labels as ids or as the names in the task's `id2label`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from flexmerge.errors import ConfigError
from flexmerge.evaluation.data import read_examples
from flexmerge.evaluation.hf import (
    CLASSIFIER,
    TaskDirs,
    check_counts,
    check_data_names,
    describe,
    load_weights,
    require_kind,
    task_side_files,
)
from flexmerge.runtime.hf_model import build_model, load_config, load_tokenizer
from flexmerge.taskvec import TaskSet

ROWS_HINT = "; its rows are text and label"


class TextClassificationEvaluator:
    """Accuracy of each task's sequence-classification model on its labelled examples.

    The task's config and tokenizer are the ones its artifact would carry (the fine-tune's
    directory, or for a PEFT adapter its directory and then the base's). Inputs are tokenized
    once per task; each call builds nothing but loads the given weights into the task's model."""

    metric = "accuracy"

    def __init__(self, tasks: TaskSet, data: Mapping[str, str | Path], limit: int | None = 1000, batch_size: int = 32,
                 max_length: int | None = None):
        check_data_names(tasks, data)
        check_counts(limit, batch_size)
        self.batch_size = batch_size
        self._dirs = TaskDirs()
        files = task_side_files(tasks)
        self._models: dict[str, torch.nn.Module] = {}
        self._batches: dict[str, list[tuple[dict[str, torch.Tensor], torch.Tensor]]] = {}
        for task in tasks.names:
            arch = require_kind(files[task], task, CLASSIFIER)
            directory = self._dirs.unpack(task, files[task])
            examples = read_examples(data[task], limit, hint=f"; {describe(CLASSIFIER, arch, task)}{ROWS_HINT}")
            self._models[task] = build_model(load_config(directory, task), task)
            labels = _label_ids(self._models[task].config, task, examples, data[task])
            self._batches[task] = _tokenized(directory, task, [x for x, _ in examples], labels, batch_size, max_length)

    def __call__(self, task: str, state: dict[str, torch.Tensor]) -> float:
        model = self._models[task]
        load_weights(model, state, task)
        correct = total = 0
        with torch.inference_mode():
            for batch, labels in self._batches[task]:
                predicted = model(**batch).logits.argmax(-1)
                correct += int((predicted == labels).sum())
                total += len(labels)
        return correct / total


def _label_ids(config: Any, task: str, examples: list[tuple[str, Any]], source: str | Path) -> torch.Tensor:
    """Each label as an id of the task's head: an id below num_labels, or a name of its id2label."""
    names = {str(v): int(k) for k, v in config.id2label.items()}
    ids = []
    for _, label in examples:
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
    return torch.tensor(ids)


def _tokenized(directory: Path, task: str, texts: list[str], labels: torch.Tensor, batch_size: int,
               max_length: int | None):
    tokenizer = load_tokenizer(directory, task)
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
        out.append((dict(batch), labels[start:start + batch_size]))
    return out
