"""`fashion`: an offline vision suite — a small CNN, Fashion-MNIST and digits, minutes on a CPU.

Data: Fashion-MNIST from Debian's `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist,
the four idx files of the original release) and scikit-learn's bundled 8x8 digits. The base
encoder (stem conv, five residual conv layers, pooled projection) is pretrained on upright
Fashion-MNIST images of half the train set, for PRETRAIN_CLASSES only. Each of the 8 tasks
sees its own input domain (rotation, inversion, flip, zoom, digits upsampled to 28x28) with its
own label set and head, and fine-tunes the whole encoder on the other half of the train set
(digits tasks: on digits). Test splits come from Fashion-MNIST's own test set (digits: held-out
digits), never seen in pretraining or fine-tuning.
"""

from __future__ import annotations

import gzip
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from flexmerge.errors import FlexMergeError
from flexmerge.pleas.modeling import WideConvNet, layer_norm
from flexmerge.pleas.spec import CNN_NORM_GROUPS, CNN_POOL, CNN_STEM
from flexmerge.suites.base import TensorSuite
from flexmerge.suites.training import accuracy, finetune, pretrain, train

FASHION_DIR = Path(os.environ.get("FLEXMERGE_FASHION_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
INSTALL_HINT = "apt-get install dataset-fashion-mnist (or set FLEXMERGE_FASHION_DIR to a folder with the idx files)"
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
PRETRAIN_CLASSES = (1, 5, 8)  # trousers, sandals, bags: a narrow base, so the tasks need fine-tuning
WIDTHS = (16, 32)  # channels of the 14x14 and the 7x7 stages
FEATURES = 64
LAYER_STAGES = (0, 0, 1, 1, 1)  # per conv layer, the stage it writes: two at 14x14, a strided one, two at 7x7


class FashionNet(WideConvNet):
    """Encoder (N, 1, 28, 28) -> (N, 64): stem, layers.0-4 (two at 14x14, a strided one, two at
    7x7), 3x3 average pool, projection, final norm. GroupNorm, not BatchNorm: the state dict holds
    float parameters only (no running statistics or integer counters), all of them mergeable. The
    library's GroupNorm CNN (the pattern PLeaS's fashion-cnn spec reads) at this suite's widths."""

    def __init__(self) -> None:
        super().__init__(1, [[c, 0] for c in WIDTHS], [c // CNN_NORM_GROUPS for c in WIDTHS], list(LAYER_STAGES),
                         [FEATURES, 0], list(CNN_STEM), CNN_POOL, norm=layer_norm)


# views: (N, 28, 28) -> (N, 28, 28) ------------------------------------------------------------
def zoom(x: torch.Tensor, crop: int = 16) -> torch.Tensor:
    """The central crop x crop pixels, rescaled (bilinear) back to 28x28."""
    lo = (28 - crop) // 2
    return _resize(x[:, lo:lo + crop, lo:lo + crop], 28)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return torch.nn.functional.interpolate(x[:, None], size=(size, size), mode="bilinear",
                                           align_corners=False)[:, 0].clamp(0, 1)


def digits_28(images: torch.Tensor) -> torch.Tensor:
    """sklearn's 8x8 digits (0-16) as MNIST-like 28x28 images: upsampled to 20x20, 4 pixels margin."""
    return torch.nn.functional.pad(_resize(images / 16.0, 20), (4, 4, 4, 4))


def _group(groups: list[tuple[int, ...]]) -> Callable[[torch.Tensor], torch.Tensor]:
    lookup = torch.full((10,), -1, dtype=torch.long)
    for g, members in enumerate(groups):
        lookup[list(members)] = g
    return lambda y: lookup[y]


@dataclass(frozen=True)
class FashionTask:
    name: str
    source: str  # "fashion" or "digits"
    view: Callable[[torch.Tensor], torch.Tensor]
    classes: tuple[int, ...]  # source labels kept, in label order unless `label` regroups them
    label: Callable[[torch.Tensor], torch.Tensor] | None = None  # source label -> task label
    num_labels: int = 0  # with `label`; else len(classes)

    @property
    def num_classes(self) -> int:
        return self.num_labels or len(self.classes)

    def labels(self, y: torch.Tensor) -> torch.Tensor:
        if self.label is not None:
            return self.label(y)
        lookup = torch.full((10,), -1, dtype=torch.long)
        lookup[list(self.classes)] = torch.arange(len(self.classes))
        return lookup[y]


ALL = tuple(range(10))
TASKS = [
    FashionTask("rot90", "fashion", lambda x: torch.rot90(x, 1, (1, 2)), ALL),
    FashionTask("inverted_groups", "fashion", lambda x: 1 - x, ALL,
                _group([(0, 2, 4, 6), (1, 3), (5, 7, 9), (8,)]), 4),  # tops / trousers+dresses / shoes / bags
    FashionTask("upper_body_flipped", "fashion", lambda x: torch.flip(x, (1,)), (0, 2, 4, 6)),  # upside down
    FashionTask("footwear_bags_zoom", "fashion", zoom, (5, 7, 8, 9)),
    FashionTask("transposed", "fashion", lambda x: x.transpose(1, 2), ALL),
    FashionTask("digits", "digits", lambda x: x, ALL),
    FashionTask("digits_inverted_mod3", "digits", lambda x: 1 - x, ALL, lambda y: y % 3, 3),
    FashionTask("digits_rot180_zoom", "digits", lambda x: zoom(torch.rot90(x, 2, (1, 2)), 20), ALL),
]


# data -----------------------------------------------------------------------------------------
def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """One gzipped idx file (the MNIST format) as a uint8 tensor; FlexMergeError when it is missing,
    truncated, or not an idx file of `ndim` dimensions."""
    if not path.is_file():
        raise FlexMergeError(f"Fashion-MNIST file {path} is missing ({INSTALL_HINT})")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise FlexMergeError(f"Fashion-MNIST file {path} is not a readable gzip file ({e}); reinstall it "
                             f"({INSTALL_HINT})") from None
    if len(raw) < 4 + 4 * ndim or raw[:4] != bytes([0, 0, 8, ndim]):
        raise FlexMergeError(f"Fashion-MNIST file {path} is not an idx file of {ndim}-D unsigned bytes "
                             f"(header {raw[:4].hex() or 'empty'})")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    body = raw[4 + 4 * ndim:]
    expected = 1
    for s in shape:
        expected *= s
    if len(body) != expected:
        raise FlexMergeError(f"Fashion-MNIST file {path} holds {len(body)} bytes of data, its header says "
                             f"{expected} (shape {shape}): the file is truncated or damaged")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def read_fashion(root: Path | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"train", "test"}: images (N, 28, 28) as uint8 (0-255) and labels (N,), as the files store them."""
    root, out = root or FASHION_DIR, {}
    for split, (images_file, labels_file) in FASHION_FILES.items():
        images, labels = read_idx(root / images_file, 3), read_idx(root / labels_file, 1)
        if images.shape[1:] != (28, 28) or len(images) != len(labels) or int(labels.max()) > 9:
            raise FlexMergeError(f"Fashion-MNIST {split} files in {root} disagree: images {tuple(images.shape)}, "
                                 f"{len(labels)} labels (max {int(labels.max())}); expected 28x28 images, one "
                                 "label 0-9 each")
        out[split] = (images, labels.long())
    return out


def _unit(images: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1]: Fashion-MNIST's bytes scaled, digits (already 28x28 floats) as they are."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images


def _take(order: torch.Tensor, keep: torch.Tensor, n: int, what: str) -> torch.Tensor:
    picked = order[keep[order]][:n]
    if len(picked) < n:
        raise FlexMergeError(f"{what}: {len(picked)} examples available, {n} asked for")
    return picked


class FashionSuite(TensorSuite):
    name = "fashion"
    description = "small CNN pretrained on 3 Fashion-MNIST classes, 8 tasks (views x label sets, digits); minutes"

    def __init__(self, seed: int = 0, pretrain_examples: int = 4000, pretrain_epochs: int = 2,
                 sizes: tuple[int, int, int] = (1500, 500, 1000), finetune_epochs: int = 4, lr: float = 1.5e-3,
                 batch_size: int = 32, task_subset: list[str] | None = None):
        self.seed, self.pretrain_examples, self.pretrain_epochs = seed, pretrain_examples, pretrain_epochs
        self.sizes, self.finetune_epochs, self.lr, self.batch_size = sizes, finetune_epochs, lr, batch_size
        self.task_subset = task_subset
        self._data: dict[str, Any] | None = None

    def tasks(self) -> list[FashionTask]:
        if not self.task_subset:
            return list(TASKS)
        by_name = {t.name: t for t in TASKS}
        unknown = [t for t in self.task_subset if t not in by_name]
        if unknown:
            raise FlexMergeError(f"unknown fashion task(s) {unknown}; the tasks are {list(by_name)}")
        return [by_name[t] for t in self.task_subset]

    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks()]

    def config(self) -> dict[str, Any]:
        return {"tasks": self.task_names(), "seed": self.seed, "pretrain_examples": self.pretrain_examples,
                "pretrain_epochs": self.pretrain_epochs, "pretrain_classes": list(PRETRAIN_CLASSES),
                "sizes": list(self.sizes), "finetune_epochs": self.finetune_epochs, "lr": self.lr,
                "batch_size": self.batch_size,
                "widths": list(WIDTHS), "version": 1}

    def unavailable_reason(self) -> str | None:
        missing = [f for pair in FASHION_FILES.values() for f in pair if not (FASHION_DIR / f).is_file()]
        if missing:
            return f"Fashion-MNIST not found in {FASHION_DIR} (missing {', '.join(missing)}): {INSTALL_HINT}"
        try:
            import sklearn.datasets  # noqa: F401
        except ImportError:
            return "scikit-learn is not installed (pip install 'flexmerge[suites]')"
        return None

    def data(self) -> dict[str, Any]:
        """Pretraining images and labels; per task: train/val/test inputs (N, 1, 28, 28) and labels;
        `indices`: per task and split, the positions in `sources[task.source][split]` (images as
        stored: Fashion-MNIST's uint8 bytes, digits as 28x28 floats in [0, 1])."""
        if self._data is None:
            self._data = self._make_data()
        return self._data

    def _make_data(self) -> dict[str, Any]:
        from sklearn.datasets import load_digits

        fashion = read_fashion()
        raw = load_digits()
        digits = (digits_28(torch.tensor(raw.images, dtype=torch.float32)), torch.tensor(raw.target, dtype=torch.long))
        gen = torch.Generator().manual_seed(self.seed)
        x_train, y_train = fashion["train"]
        order = torch.randperm(len(y_train), generator=gen)
        pre_pool, task_pool = order[: len(order) // 2], order[len(order) // 2:]  # the base's half, the tasks' half
        pre = _take(pre_pool, torch.isin(y_train, torch.tensor(PRETRAIN_CLASSES)), self.pretrain_examples,
                    "pretraining")
        sources = {"fashion": {"train": fashion["train"], "val": fashion["train"], "test": fashion["test"]},
                   "digits": {"train": digits, "val": digits, "test": digits}}
        tasks, indices = {}, {}
        digit_order = torch.randperm(len(digits[1]), generator=gen)
        for k, task in enumerate(TASKS):  # all 8, so that a subset draws the same examples
            cut = (self._fashion_cut(k, task, y_train, task_pool, fashion["test"][1]) if task.source == "fashion"
                   else self._digits_cut(digit_order))
            if task.name not in self.task_names():
                continue
            indices[task.name] = cut
            tasks[task.name] = {split: (task.view(_unit(sources[task.source][split][0][idx]))[:, None],
                                        task.labels(sources[task.source][split][1][idx])) for split, idx in cut.items()}
        return {"pretrain": (_unit(x_train[pre])[:, None], y_train[pre]), "tasks": tasks, "indices": indices,
                "sources": sources, "pretrain_indices": pre}

    def _fashion_cut(self, k: int, task: FashionTask, y_train: torch.Tensor, task_pool: torch.Tensor,
                     y_test: torch.Tensor) -> dict[str, torch.Tensor]:
        """Train/val from the tasks' half of the train set, test from the test set; the task's classes only."""
        n_train, n_val, n_test = self.sizes
        tgen = torch.Generator().manual_seed(self.seed * 1000 + k)
        pool = task_pool[torch.randperm(len(task_pool), generator=tgen)]
        train_val = _take(pool, torch.isin(y_train, torch.tensor(task.classes)), n_train + n_val,
                          f"task {task.name} train+val")
        test = _take(torch.randperm(len(y_test), generator=tgen), torch.isin(y_test, torch.tensor(task.classes)),
                     n_test, f"task {task.name} test")
        return {"train": train_val[:n_train], "val": train_val[n_train:], "test": test}

    def _digits_cut(self, order: torch.Tensor) -> dict[str, torch.Tensor]:
        """1797 digits: 50/15/35% train/val/test (at most `sizes`), the same for every digits task."""
        a, b = int(0.5 * len(order)), int(0.65 * len(order))
        n_train, n_val, n_test = self.sizes
        return {"train": order[:a][:n_train], "val": order[a:b][:n_val], "test": order[b:][:n_test]}

    def build(self, directory: Path) -> dict[str, Any]:
        data = self.data()
        t0 = time.perf_counter()
        base = pretrain(FashionNet, FEATURES, *data["pretrain"], epochs=self.pretrain_epochs,
                        batch_size=self.batch_size, lr=self.lr, seed=self.seed, desc="pretraining fashion base")
        save_file(base.state_dict(), str(directory / "base.safetensors"))
        info: dict[str, Any] = {"pretrain_seconds": time.perf_counter() - t0, "finetuned": {}, "base_with_head": {},
                                "finetune_seconds": {}, "test_examples": {}, "val_finetuned": {},
                                "val_base_with_head": {}}
        for k, task in enumerate(self.tasks()):
            splits = data["tasks"][task.name]
            info["test_examples"][task.name] = len(splits["test"][1])
            probe = self._probe(base, splits, task.num_classes, k)
            info["base_with_head"][task.name], info["val_base_with_head"][task.name] = probe["test"], probe["val"]
            t1 = time.perf_counter()
            model, head = finetune(FashionNet, base, FEATURES, task.num_classes, *splits["train"],
                                   epochs=self.finetune_epochs, batch_size=self.batch_size, lr=self.lr,
                                   seed=self.seed + k, desc=f"fine-tuning task {k + 1} of {len(self.tasks())}")
            info["finetune_seconds"][task.name] = time.perf_counter() - t1
            save_file(model.state_dict(), str(directory / "models" / f"{task.name}.safetensors"))
            save_file(head.state_dict(), str(directory / "heads" / f"{task.name}.safetensors"))
            for split, key in (("test", "finetuned"), ("val", "val_finetuned")):
                xs, ys = splits[split]
                info[key][task.name] = accuracy(lambda i: head(model(xs[i])), ys)
        return info

    def _probe(self, base: FashionNet, splits, classes: int, k: int) -> dict[str, float]:
        """Base encoder, frozen, with a head trained on the task: the no-fine-tuning reference."""
        with torch.no_grad():
            feats = {s: torch.cat([base(x[i]) for i in torch.arange(len(x)).split(512)])
                     for s, (x, _) in splits.items()}
        head = torch.nn.Linear(FEATURES, classes)
        train(lambda i: head(feats["train"][i]), head.parameters(), splits["train"][1], epochs=40, batch_size=64,
              lr=1e-2, seed=self.seed + k, desc=f"head on the frozen base (task {k + 1} of {len(self.tasks())})")
        return {s: accuracy(lambda i: head(feats[s][i]), splits[s][1]) for s in ("val", "test")}

    def network(self) -> FashionNet:
        return FashionNet()
