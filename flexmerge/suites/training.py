"""Minimal, seeded supervised training and accuracy loops shared by the suites."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from flexmerge._progress import Progress

Batch = tuple[object, torch.Tensor]


def minibatches(n: int, batch_size: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return list(order.split(batch_size))


def train(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    params: Sequence[torch.nn.Parameter] | Iterable[dict],
    labels: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    desc: str,
    weight_decay: float = 0.0,
    max_steps: int | None = None,
) -> int:
    """Cross-entropy training; `logits_fn(indices)` gives those examples' logits. Returns the step count."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = [idx for _ in range(epochs) for idx in minibatches(len(labels), batch_size, gen)][:max_steps]
    with Progress(desc, len(steps), "steps") as bar:
        for idx in steps:
            loss = torch.nn.functional.cross_entropy(logits_fn(idx), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(loss=loss.item())
    return len(steps)


@torch.inference_mode()
def accuracy(logits_fn: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor, batch_size: int = 256,
             order: torch.Tensor | None = None) -> float:
    """The share of examples whose argmax logit is their label, in minibatches of `batch_size`
    taken in `order` (default: as given; e.g. by length, so that each batch pads little)."""
    correct = 0
    for idx in (order if order is not None else torch.arange(len(labels))).split(batch_size):
        correct += int((logits_fn(idx).argmax(-1) == labels[idx]).sum())
    return correct / len(labels)


def pretrain(network: Callable[[], torch.nn.Module], features: int, inputs: torch.Tensor, labels: torch.Tensor, *,
             epochs: int, batch_size: int, lr: float, seed: int, desc: str, classes: int = 10) -> torch.nn.Module:
    """A suite's base encoder: a new `network()` and a `classes`-way head trained together on the
    pretraining split. Both initialize from torch's global RNG seeded with `seed` (encoder first), so
    a suite's zoo is reproducible; returns the encoder, in eval mode (the head is dropped)."""
    torch.manual_seed(seed)
    base, head = network(), torch.nn.Linear(features, classes)
    train(lambda i: head(base(inputs[i])), [*base.parameters(), *head.parameters()], labels, epochs=epochs,
          batch_size=batch_size, lr=lr, seed=seed, desc=desc)
    return base.eval()


def finetune(network: Callable[[], torch.nn.Module], base: torch.nn.Module, features: int, classes: int,
             inputs: torch.Tensor, labels: torch.Tensor, *, epochs: int, batch_size: int, lr: float, seed: int,
             desc: str) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """A task's model: the whole encoder, started from `base`, and a new head trained on the task's
    split. The new modules draw their (overwritten or kept) initial weights from torch's global RNG,
    encoder first; returns both, in eval mode."""
    model = network()
    model.load_state_dict(base.state_dict())
    model.train()
    head = torch.nn.Linear(features, classes)
    train(lambda i: head(model(inputs[i])), [*model.parameters(), *head.parameters()], labels, epochs=epochs,
          batch_size=batch_size, lr=lr, seed=seed, desc=desc)
    return model.eval(), head.eval()
