"""A task's Hugging Face config, tokenizer and (empty) model, built from files that came with an
artifact or a fine-tune and are therefore untrusted: no remote code (and so no interactive
"run the custom code?" prompt), only model classes of transformers itself, and a config whose
vocabulary matches the weights it will receive, checked before any model is allocated."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flexmerge.errors import FlexMergeError


def load_config(directory: Path, task: str) -> Any:
    """The task's config, read without remote code; a bad file is one FlexMergeError naming the task."""
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(directory, trust_remote_code=False)
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as e:
        raise FlexMergeError(f"task {task!r}: its config.json cannot be used ({_first_line(e)})") from None


def load_tokenizer(directory: Path, task: str) -> Any:
    """The task's tokenizer, read without remote code; a bad file is one FlexMergeError."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001  (the tokenizers library raises plain Exceptions on malformed files)
        raise FlexMergeError(f"task {task!r}: its tokenizer files cannot be used ({_first_line(e)})") from None


def model_class(config: Any, task: str) -> type:
    """The config's architecture, which must name a model class of transformers (not any object the
    library exports: a config naming `Trainer` is refused)."""
    import transformers

    arch = (config.architectures or ["AutoModel"])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if arch == "AutoModel":
        return transformers.AutoModel
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise FlexMergeError(f"task {task!r}: its config names {arch!r}, which is not a model class of transformers")
    return cls


def check_vocabulary(config: Any, task: str, shapes: Iterable[tuple[int, ...]]) -> None:
    """A config's `vocab_size` must be the row count of some 2-D weight of the task: a config that
    claims 8 million tokens for a small artifact would allocate gigabytes before failing."""
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int):
        return
    rows = {s[0] for s in shapes if len(s) == 2}
    if rows and vocab not in rows:
        raise FlexMergeError(f"task {task!r}: its config.json says vocab_size {vocab}, which matches no embedding "
                             f"of its weights (row counts {sorted(rows)[-3:]}...); the config is not this model's")


def build_model(config: Any, task: str, shapes: Iterable[tuple[int, ...]] | None = None) -> Any:
    """An empty model of the task's class, in eval mode; with `shapes` (the weights it will
    receive), after the vocabulary check."""
    if shapes is not None:
        check_vocabulary(config, task, shapes)
    cls = model_class(config, task)
    model = cls.from_config(config) if cls.__name__ == "AutoModel" else cls(config)
    return model.eval()


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
