"""`wordgen` and `wordgen-lora`: generative suites of causal LMs, built offline from WordNet.

Base: a small Llama (`transformers.LlamaForCausalLM`: RMSNorm, rotary positions, SwiGLU, grouped
KV heads; untied output embeddings, as Llama 2 and 3 have them) with a BPE tokenizer and a chat
template (`flexmerge.suites.wordgen_lm`), pretrained on WordNet's dictionary entries (words,
definitions, examples). The pretrained base is a zoo of its own (`wordgen-base-<hash>` in the
cache), which both suites start from, so the second suite built reuses it.

Tasks: 8 generative tasks from WordNet (`flexmerge.suites.wordgen_data.TASKS`), each a chat whose
answer is one word or phrase. `wordgen` fine-tunes every tensor of the base on each task
(embeddings and lm_head included: one Hugging Face model directory per task); `wordgen-lora`
trains a PEFT LoRA adapter per task instead (peft's own `get_peft_model` / `save_pretrained`).
The zoo keeps each task's rows as chat JSONL (`data/<task>/<split>.jsonl`), and evaluation is
`flexmerge.evaluation.GenerationEvaluator` on them: batched greedy decoding, exact match of the
normalized answer: the same numbers `flexmerge sweep --base ... --eval-data` gives on the zoo.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from flexmerge.errors import ConfigError, UnknownNameError
from flexmerge.evaluation.generation import GenerationEvaluator
from flexmerge.io.open import open_checkpoint
from flexmerge.io.side_files import pick_side_files, read_side_files_in
from flexmerge.planning.activations import Calibration
from flexmerge.runtime.hf_model import build_model, load_config, load_tokenizer
from flexmerge.suites.base import CALIBRATION_EXAMPLES, SPLITS, Evaluator, Suite, Zoo, check_split
from flexmerge.suites.wordgen_data import TASKS, WordNet, dictionary_entry, split_pairs, task_pairs
from flexmerge.suites.wordgen_lm import (
    ModelShape,
    Schedule,
    chat_example,
    new_model,
    packed_sequences,
    padded,
    parameter_count,
    prompt_ids,
    quiet_transformers,
    train_lm,
    train_tokenizer,
)
from flexmerge.suites.wordnet import WORDNET_DIR, iter_synsets

VERSION = 1  # of the recipe: part of every config, so a changed recipe never reuses an old zoo
EVAL_BATCH = 64  # prompts per greedy-decoding batch
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@lru_cache(maxsize=2)
def wordnet(root: Path = WORDNET_DIR) -> WordNet:
    """The parsed data files (a few seconds), once per process."""
    return WordNet.of(iter_synsets(root))


def missing_requirement(*modules: str) -> str | None:
    """Why the suites cannot run here (WordNet or a package missing), or None."""
    if not (WORDNET_DIR / "data.noun").is_file():
        return f"WordNet data not found in {WORDNET_DIR} (apt-get install wordnet-base)"
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install 'flexmerge[suites]')"
    return None


@dataclass(frozen=True)
class Pretraining:
    """The base model's recipe: its shape, and next-token training on `entries` dictionary
    entries (a seeded draw of WordNet's 117,659 synsets, None: all; packed into rows of `length`
    tokens), on which the tokenizer is trained too. 40,000 entries are 1.4M tokens, more than the
    400 steps of 32 rows read (0.8M): the draw only saves tokenizing what is never read."""

    shape: ModelShape = field(default_factory=ModelShape)
    steps: int = 400
    length: int = 64
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 30
    entries: int | None = 40_000
    seed: int = 0


class WordGenBase(Suite):
    """The pretrained base both wordgen suites start from, cached as a zoo without tasks."""

    name = "wordgen-base"
    description = "the wordgen suites' pretrained Llama (no tasks)"

    def __init__(self, pretraining: Pretraining = Pretraining()):
        self.pretraining = pretraining

    def task_names(self) -> list[str]:
        return []

    def config(self) -> dict[str, Any]:
        return {**asdict(self.pretraining), "version": VERSION}

    def layout(self) -> dict[str, Any]:
        return {"base": "base", "models": {}}

    def unavailable_reason(self) -> str | None:
        return missing_requirement("transformers", "tokenizers")

    def evaluator(self, zoo: Zoo, split: str = "test") -> Evaluator:
        raise ConfigError("the wordgen base has no tasks to evaluate; sweep the wordgen or wordgen-lora suite")

    def build(self, directory: Path) -> dict[str, Any]:
        p = self.pretraining
        quiet_transformers()
        t0, cpu0 = time.perf_counter(), time.process_time()
        entries = [dictionary_entry(s) for s in wordnet().synsets.values()]
        random.Random(p.seed).shuffle(entries)
        entries = entries[:p.entries]
        tokenizer = train_tokenizer(entries, p.shape.vocab_size)
        rows = packed_sequences(tokenizer, entries, p.length)
        t1 = time.perf_counter()
        model = new_model(p.shape, tokenizer, p.seed)
        loss = train_lm(model, lambda i: {"input_ids": rows[i], "labels": rows[i]}, len(rows),
                        Schedule(p.steps, p.batch_size, p.lr, p.warmup, weight_decay=0.01), p.seed, "pretraining")
        model.save_pretrained(directory / "base")
        tokenizer.save_pretrained(directory / "base")
        return {"parameters": parameter_count(model), "entries": len(entries), "corpus_tokens": rows.numel(),
                "pretraining_tokens": p.steps * p.batch_size * p.length, "final_loss": loss,
                "tokenizer_seconds": t1 - t0, "pretrain_seconds": time.perf_counter() - t1,
                "cpu_seconds": time.process_time() - cpu0}


def relative_change(state: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
    """||fine-tune - base|| / ||base|| over every tensor: how far a fine-tune moved (the sweep's
    input check refuses more than 0.5, a sign of a wrong base)."""
    delta = sum(float((state[k].double() - base[k].double()).square().sum()) for k in base)
    return (delta / sum(float(base[k].double().square().sum()) for k in base)) ** 0.5


class WordGenSuite(Suite):
    """8 generative WordNet tasks, one full fine-tune of the pretrained Llama each (see the module)."""

    name = "wordgen"
    description = "Llama (12.6M, pretrained on WordNet) fully fine-tuned on 8 generative WordNet tasks"
    score_name = "exact match"
    base_name = "pretrained base (no fine-tuning)"

    def __init__(self, tasks: Sequence[str] | None = None, examples: tuple[int, int, int] = (2000, 100, 300),
                 steps: int = 200, batch_size: int = 16, lr: float = 5e-4, seed: int = 0,
                 pretraining: Pretraining = Pretraining()):
        """`examples`: at most that many train, and exactly that many val and test rows per task;
        `steps` minibatches of `batch_size` chats each fine-tune, at `lr` (warmup, cosine decay)."""
        unknown = [t for t in tasks or () if t not in TASKS]
        if unknown:
            raise UnknownNameError("wordgen task", unknown[0], TASKS)
        self.tasks = list(tasks or TASKS)
        self.examples, self.steps, self.batch_size, self.lr = tuple(examples), steps, batch_size, lr
        self.seed, self.pretraining = seed, pretraining
        self._splits: dict[str, dict[str, list[tuple[str, str]]]] | None = None

    def task_names(self) -> list[str]:
        return list(self.tasks)

    def config(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "examples": list(self.examples), "steps": self.steps, "batch_size": self.batch_size,
                "lr": self.lr, "seed": self.seed, "pretraining": WordGenBase(self.pretraining).config(),
                "version": VERSION}

    def requires(self) -> list[Suite]:
        return [WordGenBase(self.pretraining)]

    def layout(self) -> dict[str, Any]:
        return {"base": "base", "models": {t: f"models/{t}" for t in self.tasks}}

    def unavailable_reason(self) -> str | None:
        return missing_requirement("transformers", "tokenizers")

    def base_scores(self, zoo: Zoo) -> dict[str, float] | None:
        return zoo.info.get("base")

    def serving_reason(self) -> str | None:
        return (f"suite {self.name!r} holds causal LMs, which `serve --suite` (task heads and labels) does not "
                "serve; merge its zoo (`flexmerge merge`) and serve the artifact, whose exports carry the "
                "tokenizer and chat template")

    # data -----------------------------------------------------------------------------------
    def splits(self) -> dict[str, dict[str, list[tuple[str, str]]]]:
        """Per task, its (prompt, answer) rows of each split (seeded; disjoint prompts)."""
        if self._splits is None:
            n_train, n_val, n_test = self.examples
            self._splits = {t: split_pairs(task_pairs(wordnet(), t, n_train + n_val + n_test, self.seed + k),
                                           n_val, n_test, n_train) for k, t in enumerate(self.tasks)}
        return self._splits

    @staticmethod
    def data_file(directory: Path, task: str, split: str) -> Path:
        return directory / "data" / task / f"{split}.jsonl"

    def write_rows(self, directory: Path) -> None:
        """Every split as chat rows, `{"messages": [user prompt, assistant answer]}` per line."""
        for task, splits in self.splits().items():
            for split in SPLITS:
                path = self.data_file(directory, task, split)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": prompt},
                                                                 {"role": "assistant", "content": answer}]}) + "\n"
                                        for prompt, answer in splits[split]))

    # build ----------------------------------------------------------------------------------
    def build(self, directory: Path, required: Sequence[Zoo] = ()) -> dict[str, Any]:
        (pretrained,) = required
        quiet_transformers()
        cpu0 = time.process_time()
        shutil.copytree(pretrained.base, directory / "base")
        self.write_rows(directory)
        tokenizer = load_tokenizer(directory / "base", "base")
        base = self._load_base(directory)
        info: dict[str, Any] = {"pretraining": pretrained.info, "parameters": parameter_count(base),
                                "finetune_seconds": {}, "final_loss": {}, "train_examples": {}, "test_examples": {}}
        for k, task in enumerate(self.tasks):
            examples = [chat_example(tokenizer, p, a) for p, a in self.splits()[task]["train"]]
            model = self.trainable(copy.deepcopy(base), k)
            t0 = time.perf_counter()
            info["final_loss"][task] = train_lm(
                model, lambda i: padded([examples[j] for j in i], tokenizer.pad_token_id), len(examples),
                Schedule(self.steps, self.batch_size, self.lr, warmup=min(10, self.steps // 10)), self.seed + k,
                f"fine-tuning {task} (task {k + 1} of {len(self.tasks)})")
            info["finetune_seconds"][task] = time.perf_counter() - t0
            info["train_examples"][task] = len(examples)
            info["test_examples"][task] = len(self.splits()[task]["test"])
            self.save(model, tokenizer, directory / self.layout()["models"][task])
        t0 = time.perf_counter()
        evaluate = self._evaluator(directory, "test")
        base_state = load_file(directory / "base" / "model.safetensors")
        info["base"] = {t: evaluate(t, base_state) for t in self.tasks}
        info["finetuned"], info["relative_change"] = {}, {}
        for task in self.tasks:
            state = self.finetuned_state(directory, task)
            info["finetuned"][task] = evaluate(task, state)
            info["relative_change"][task] = relative_change(state, base_state)
        info["eval_seconds"] = time.perf_counter() - t0
        info["cpu_seconds"] = time.process_time() - cpu0
        return info

    def _load_base(self, directory: Path):
        model = build_model(load_config(directory / "base", "base"), "base")
        model.load_state_dict(load_file(directory / "base" / "model.safetensors"), strict=False)
        return model

    def trainable(self, model, k: int):
        """The model whose trainable parameters a task's fine-tuning trains: all of them."""
        return model

    def save(self, model, tokenizer, out: Path) -> None:
        """A full fine-tune is a whole model directory, tokenizer and chat template included."""
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    def finetuned_state(self, directory: Path, task: str) -> dict[str, torch.Tensor]:
        """Task `task`'s fine-tuned weights as the sweep reads them (a LoRA adapter: the fine-tune it makes)."""
        source = open_checkpoint(directory / self.layout()["models"][task], base=directory / "base")
        return {key: source.read(key) for key in source.keys()}

    # evaluation -----------------------------------------------------------------------------
    def evaluator(self, zoo: Zoo, split: str = "test") -> Evaluator:
        """Exact match of greedy completions of the task's `split` (batched, left padded, KV cache)."""
        return self._evaluator(zoo.directory, check_split(split))

    def _evaluator(self, directory: Path, split: str) -> GenerationEvaluator:
        base = read_side_files_in(directory / "base")
        files = {}
        for task in self.tasks:
            own = directory / self.layout()["models"][task]
            files[task] = pick_side_files(read_side_files_in(own) if own.is_dir() else {}, base)
        data = {t: self.data_file(directory, t, split) for t in self.tasks}
        return GenerationEvaluator.from_side_files(files, data, limit=None, batch_size=EVAL_BATCH)

    def calibration(self, zoo: Zoo, per_task: int = CALIBRATION_EXAMPLES) -> Calibration:
        """The first `per_task` validation prompts of each task, rendered by the chat template, run
        one at a time (no padding enters the layers' input statistics)."""
        tokenizer = load_tokenizer(zoo.base, "base")
        inputs = {}
        for task in zoo.tasks:
            prompts = [p for p, _ in self.splits()[task]["val"][:per_task]]
            inputs[task] = [torch.tensor([prompt_ids(tokenizer, p)]) for p in prompts]

        def forward(model, batches) -> None:
            for ids in batches:
                model(input_ids=ids)

        return Calibration(self._load_base(zoo.directory).eval(), inputs, forward)


class WordGenLoraSuite(WordGenSuite):
    """The wordgen tasks as PEFT LoRA adapters of the same pretrained base."""

    name = "wordgen-lora"
    description = "Llama (12.6M, pretrained on WordNet) with a LoRA adapter per generative WordNet task (8)"

    def __init__(self, tasks: Sequence[str] | None = None, examples: tuple[int, int, int] = (2000, 100, 300),
                 steps: int = 200, batch_size: int = 16, lr: float = 2e-3, seed: int = 0,
                 pretraining: Pretraining = Pretraining(), rank: int = 16, alpha: float = 32.0):
        """As `WordGenSuite`; LoRA of `rank` (scaling alpha / rank) on every attention and MLP projection."""
        super().__init__(tasks, examples, steps, batch_size, lr, seed, pretraining)
        self.rank, self.alpha = rank, alpha

    def config(self) -> dict[str, Any]:
        return {**super().config(), "lora": {"rank": self.rank, "alpha": self.alpha, "targets": list(LORA_TARGETS)}}

    def unavailable_reason(self) -> str | None:
        return missing_requirement("transformers", "tokenizers", "peft")

    def trainable(self, model, k: int):
        """peft's LoRA model of `model`: only the adapters train (A drawn from torch's RNG, B zero)."""
        import peft

        torch.manual_seed(self.seed + k)
        # what adapter_config.json and the adapter's card name as the base: the zoo's, seen from the
        # adapter's directory (not the build's work directory, which is renamed when done)
        model.name_or_path = model.config.name_or_path = "../../base"
        config = peft.LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(LORA_TARGETS),
                                 lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        return peft.get_peft_model(model, config)

    def save(self, model, tokenizer, out: Path) -> None:
        """An adapter directory holds the adapter alone: its tokenizer and config are the base's.
        (No embedding layer is adapted, so none is saved; peft's "auto" would look the base up
        on the Hub to decide.)"""
        model.save_pretrained(out, save_embedding_layers=False)
