"""Evaluators for your own models, for `flexmerge sweep --base ... --model ...`.

An evaluator is `(task, state_dict) -> score`, higher is better; the sweep calls it on the
fine-tuned models once (the reference) and on every merged point. The ways to get one:

* `load_evaluator("package.module:function")` (custom.py): your own code (imported like any
  module; the current directory is searched first, as `python -m` would).
* `data_evaluator(tasks, {"task": "dev.jsonl"})` (dispatch.py, the CLI's `--eval-data`): one file
  per task, scored by the evaluator that fits the tasks' Hugging Face architecture:
  - `TextClassificationEvaluator` (classification.py): accuracy of `*ForSequenceClassification`
    fine-tunes on rows with `text` and `label` (labels as ids or as the names in `id2label`);
  - `GenerationEvaluator` (generation.py): `*ForCausalLM` fine-tunes on rows with `prompt` and
    `completion` or chat `messages`: exact match of greedy completions, or the completions' token
    probability (`metric="loglik"`).
  Each uses the task's own config and tokenizer (those its artifact would carry), in batches.

The files themselves (JSONL or CSV, every error naming file and row) are read by data.py.
"""

from flexmerge.evaluation.classification import TextClassificationEvaluator
from flexmerge.evaluation.custom import Evaluator, load_evaluator
from flexmerge.evaluation.data import (
    DATA_MAX_BYTES,
    GenerationRow,
    read_examples,
    read_generation_rows,
    read_text_pairs,
)
from flexmerge.evaluation.dispatch import data_evaluator
from flexmerge.evaluation.generation import METRICS, GenerationEvaluator, check_metric, normalize

__all__ = ["DATA_MAX_BYTES", "METRICS", "Evaluator", "GenerationEvaluator", "GenerationRow",
           "TextClassificationEvaluator", "check_metric", "data_evaluator", "load_evaluator", "normalize",
           "read_examples", "read_generation_rows", "read_text_pairs"]
