"""The wordgen suites' language model: a BPE tokenizer with a chat template, a small Llama, and
the loops that pretrain it on dictionary text and fine-tune it (every tensor, or LoRA adapters)
on a task's chats.

The tokenizer is trained by Hugging Face `tokenizers` (BPE on Metaspace words, Llama's `▁`
convention, punctuation split off) and wrapped as a transformers fast tokenizer whose chat
template writes `<s><|user|>prompt<|end|><|assistant|>answer<|end|>`; `<|end|>` is the EOS token,
so greedy decoding stops at the end of the assistant's turn. Fine-tuning sees exactly the tokens
`flexmerge.evaluation.generation` decodes from: the rendered prompt, then the answer tokenized
on its own, then EOS; the loss is on the answer and EOS only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from flexmerge._progress import Progress
from flexmerge.suites.training import minibatches

BOS, EOS, PAD, UNK = "<s>", "<|end|>", "<pad>", "<unk>"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = [UNK, PAD, BOS, EOS, *(f"<|{r}|>" for r in ROLES)]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles are system, user and assistant, not ' + message['role']) }}{% endif %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
IGNORE = -100  # label of tokens without loss (the prompt, padding)


@dataclass(frozen=True)
class ModelShape:
    """What `transformers.LlamaConfig` is built from (the rest: its defaults, rotary theta 10000)."""

    vocab_size: int = 4096
    hidden_size: int = 384
    intermediate_size: int = 1024
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    max_position_embeddings: int = 128


@dataclass(frozen=True)
class Schedule:
    """AdamW with a linear warmup and a cosine decay to 10% of `lr` over `steps` minibatches."""

    steps: int
    batch_size: int
    lr: float
    warmup: int = 0
    weight_decay: float = 0.0


def quiet_transformers() -> None:
    """No progress bars ("Writing model shards") or warnings from transformers while a zoo is built."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A BPE tokenizer trained on `texts`, as a transformers fast tokenizer with the chat template."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(prepend_scheme="always"),
                                                 pre_tokenizers.Punctuation(behavior="isolated")])
    tok.decoder = decoders.Metaspace(prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                                pad_token=PAD, chat_template=CHAT_TEMPLATE)


def new_model(shape: ModelShape, tokenizer, seed: int):
    """A freshly initialized LlamaForCausalLM (untied output embeddings) with the tokenizer's
    special ids in its config and generation config; weights drawn from torch's RNG seeded `seed`."""
    import transformers

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config = transformers.LlamaConfig(**asdict(shape), tie_word_embeddings=False, **ids)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    model.generation_config = transformers.GenerationConfig(**ids)
    return model


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def packed_sequences(tokenizer, texts: Sequence[str], length: int) -> torch.Tensor:
    """`BOS text EOS` of every text, concatenated and cut into rows of `length` tokens (the last
    partial row dropped): pretraining wastes no compute on padding."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    flat = [t for row in ids for t in (tokenizer.bos_token_id, *row, tokenizer.eos_token_id)]
    rows = len(flat) // length
    return torch.tensor(flat[:rows * length], dtype=torch.long).view(rows, length)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The user's `prompt` rendered by the chat template, ready for the assistant's answer."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def chat_example(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one chat: the rendered prompt (no loss), the answer and EOS (loss)."""
    head = prompt_ids(tokenizer, prompt)
    tail = [*tokenizer(answer, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    return [*head, *tail], [IGNORE] * len(head) + tail


def padded(examples: Sequence[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    """A right-padded batch (the loss ignores the padding) with its attention mask and labels."""
    width = max(len(ids) for ids, _ in examples)
    out = {"input_ids": torch.full((len(examples), width), pad, dtype=torch.long),
           "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
           "labels": torch.full((len(examples), width), IGNORE, dtype=torch.long)}
    for i, (ids, labels) in enumerate(examples):
        out["input_ids"][i, :len(ids)] = torch.tensor(ids)
        out["attention_mask"][i, :len(ids)] = 1
        out["labels"][i, :len(ids)] = torch.tensor(labels)
    return out


def train_lm(model: torch.nn.Module, batch_of: Any, count: int, schedule: Schedule, seed: int, desc: str) -> float:
    """Train `model` (its parameters that require grad) for `schedule.steps` minibatches drawn
    without replacement from `count` examples, epoch after epoch, in a seeded order;
    `batch_of(indices)` gives the model's inputs with labels. Returns the last step's loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=schedule.weight_decay)
    lr = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, schedule))
    gen = torch.Generator().manual_seed(seed)
    order: list[torch.Tensor] = []
    model.train()
    loss = torch.tensor(float("nan"))
    with Progress(desc, schedule.steps, "steps") as bar:
        for _ in range(schedule.steps):
            if not order:
                order = minibatches(count, schedule.batch_size, gen)
            loss = model(**batch_of(order.pop(0))).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            lr.step()
            bar.update(loss=loss.item())
    model.eval()
    return loss.item()


def lr_factor(step: int, schedule: Schedule) -> float:
    if step < schedule.warmup:
        return (step + 1) / schedule.warmup
    progress = (step - schedule.warmup) / max(1, schedule.steps - schedule.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
