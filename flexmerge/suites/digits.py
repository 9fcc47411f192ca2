"""`digits`: a tiny, fully offline suite for tests and CI (seconds on a CPU).

scikit-learn's bundled 8x8 digits. A small residual MLP is pretrained on 40% of the images
(plain 10-class digits); each of the 8 tasks fine-tunes it on the other images, seen through its
own input domain (rotation, flip, inversion, ...) and with its own label set and head.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from flexmerge.pleas.modeling import WideResidualMLP, layer_norm
from flexmerge.suites.base import TensorSuite
from flexmerge.suites.training import accuracy, finetune, pretrain, train

WIDTH, HIDDEN, LAYERS = 64, 128, 3
PRIMES = {2, 3, 5, 7}


class DigitsNet(WideResidualMLP):
    """Encoder: input projection, residual MLP layers, final norm -> 64 features. The library's residual
    MLP at this suite's widths (no private units), so that PLeaS merges exactly the trained network."""

    def __init__(self) -> None:
        super().__init__(64, [WIDTH, 0], [[HIDDEN, 0]] * LAYERS, norm=layer_norm)


@dataclass(frozen=True)
class DigitsTask:
    name: str
    view: Callable[[torch.Tensor], torch.Tensor]  # (N, 8, 8) -> (N, 8, 8)
    label: Callable[[torch.Tensor], torch.Tensor]
    classes: int


def _noise(x: torch.Tensor) -> torch.Tensor:
    return (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))).clamp(0, 1)


TASKS = [
    DigitsTask("rot90", lambda x: torch.rot90(x, 1, (1, 2)), lambda y: y, 10),
    DigitsTask("flip_parity", lambda x: torch.flip(x, (2,)), lambda y: y % 2, 2),
    DigitsTask("invert_mod3", lambda x: 1 - x, lambda y: y % 3, 3),
    DigitsTask("rot180_high", lambda x: torch.rot90(x, 2, (1, 2)), lambda y: (y >= 5).long(), 2),
    DigitsTask("transpose", lambda x: x.transpose(1, 2), lambda y: y, 10),
    DigitsTask("flipud_mod4", lambda x: torch.flip(x, (1,)), lambda y: y % 4, 4),
    DigitsTask("shift_prime", lambda x: torch.roll(x, 2, 2), lambda y: torch.tensor([int(v) in PRIMES for v in y]).long(), 2),
    DigitsTask("noise_mod5", _noise, lambda y: y % 5, 5),
]


class DigitsSuite(TensorSuite):
    name = "digits"
    description = "sklearn 8x8 digits, small residual MLP, 8 tasks (domains x label sets); seconds"

    def __init__(self, seed: int = 0, pretrain_epochs: int = 60, finetune_epochs: int = 25):
        self.seed, self.pretrain_epochs, self.finetune_epochs = seed, pretrain_epochs, finetune_epochs
        self._data: dict[str, Any] | None = None

    def task_names(self) -> list[str]:
        return [t.name for t in TASKS]

    def config(self) -> dict[str, Any]:
        return {"seed": self.seed, "pretrain_epochs": self.pretrain_epochs, "finetune_epochs": self.finetune_epochs,
                "version": 1}

    def unavailable_reason(self) -> str | None:
        try:
            import sklearn.datasets  # noqa: F401
        except ImportError:
            return "scikit-learn is not installed (pip install 'flexmerge[suites]')"
        return None

    def data(self) -> dict[str, Any]:
        """Pretraining split, and per task: train/val/test inputs (N, 64) and labels."""
        if self._data is None:
            from sklearn.datasets import load_digits

            raw = load_digits()
            images = torch.tensor(raw.images, dtype=torch.float32) / 16.0
            labels = torch.tensor(raw.target, dtype=torch.long)
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
            n_pre = int(0.4 * len(order))
            pre, rest = order[:n_pre], order[n_pre:]
            n_train, n_val = int(0.5 * len(rest)), int(0.15 * len(rest))
            cut = {"train": rest[:n_train], "val": rest[n_train:n_train + n_val], "test": rest[n_train + n_val:]}
            tasks = {}
            for task in TASKS:
                tasks[task.name] = {split: (task.view(images[idx]).reshape(-1, 64), task.label(labels[idx]))
                                    for split, idx in cut.items()}
            self._data = {"pretrain": (images[pre].reshape(-1, 64), labels[pre]), "tasks": tasks,
                          "indices": {"pretrain": pre, **cut}}
        return self._data

    def build(self, directory: Path) -> dict[str, Any]:
        data = self.data()
        t0 = time.perf_counter()
        base = pretrain(DigitsNet, WIDTH, *data["pretrain"], epochs=self.pretrain_epochs, batch_size=64, lr=2e-3,
                        seed=self.seed, desc="pretraining digits base")
        save_file(base.state_dict(), str(directory / "base.safetensors"))
        info: dict[str, Any] = {"pretrain_seconds": time.perf_counter() - t0, "finetuned": {}, "base_with_head": {},
                                "finetune_seconds": {}}
        for k, task in enumerate(TASKS):
            (xt, yt), (xs, ys) = data["tasks"][task.name]["train"], data["tasks"][task.name]["test"]
            probe = torch.nn.Linear(WIDTH, task.classes)
            with torch.no_grad():
                feats, test_feats = base(xt), base(xs)
            train(lambda i: probe(feats[i]), probe.parameters(), yt, epochs=self.finetune_epochs * 2,
                  batch_size=32, lr=1e-2, seed=self.seed + k, desc=f"head only {task.name} (task {k + 1} of {len(TASKS)})")
            info["base_with_head"][task.name] = accuracy(lambda i: probe(test_feats[i]), ys)
            t1 = time.perf_counter()
            model, head = finetune(DigitsNet, base, WIDTH, task.classes, xt, yt, epochs=self.finetune_epochs,
                                   batch_size=32, lr=1e-3, seed=self.seed + k,
                                   desc=f"fine-tuning {task.name} (task {k + 1} of {len(TASKS)})")
            info["finetune_seconds"][task.name] = time.perf_counter() - t1
            save_file(model.state_dict(), str(directory / "models" / f"{task.name}.safetensors"))
            save_file(head.state_dict(), str(directory / "heads" / f"{task.name}.safetensors"))
            info["finetuned"][task.name] = accuracy(lambda i: head(model(xs[i])), ys)
        return info

    def network(self) -> DigitsNet:
        return DigitsNet()
