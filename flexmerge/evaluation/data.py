"""The evaluation files: JSONL (one object per line) or CSV with a header, read in one place so
that every error names the file and the row (its line number in a JSONL file, its row number,
header = 1, in a CSV file).

Two row formats: labelled text (`text` and `label`, for classifiers; `read_text_pairs`) and
prompts with their reference completion (`prompt` and `completion`, or a chat as `messages`,
for causal LMs; `read_generation_rows`)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexmerge.errors import ConfigError

DATA_MAX_BYTES = 256 << 20
GENERATION_FORMAT = '{"prompt": ..., "completion": ...} or {"messages": [...]}'


@dataclass(frozen=True)
class GenerationRow:
    """One prompt and its reference completion. A chat row keeps its messages before the answer
    (`messages`; `prompt` is None): the model's chat template renders them."""

    row: int
    completion: str
    prompt: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None


def read_examples(path: str | Path, limit: int | None = None, hint: str = "") -> list[tuple[str, Any]]:
    """(text, label) pairs from a JSONL (`.jsonl`, `.json`: one object per line) or CSV file with
    `text` and `label` columns; the first `limit` of them."""
    return read_text_pairs(path, "label", limit, hint=hint)


def read_text_pairs(path: str | Path, field: str, limit: int | None = None,
                    what: str = "evaluation data", hint: str = "") -> list[tuple[str, Any]]:
    """(text, row[field]) pairs from a JSONL (one object per line) or CSV file (a header naming
    `text` and `field`), the first `limit` of them: labelled examples (`field="label"`), or the
    (input, task) examples a router learns from (`field="task"`). Every error names file and row;
    `hint` (what the file is for) ends the message of a row of the wrong shape."""
    path = Path(path)
    out = []
    for n, row in read_rows(path, ("text", field), f"'text' and '{field}'", what, hint):
        if "text" not in row or field not in row:
            raise ConfigError(f"{path}: row {n} has no 'text' and '{field}' (it has {sorted(row)[:6]}){hint}")
        if not isinstance(row["text"], str):
            raise ConfigError(f"{path}: row {n}: 'text' must be a string")
        out.append((row["text"], row[field]))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ConfigError(f"{path}: no examples")
    return out


def read_generation_rows(path: str | Path, limit: int | None = None, hint: str = "") -> list[GenerationRow]:
    """The first `limit` rows of a JSONL file of `{"prompt": str, "completion": str}` or
    `{"messages": [{"role": ..., "content": ...}, ...]}` (the last message is the assistant's answer,
    the ones before it the prompt), or of a CSV file with `prompt` and `completion` columns."""
    path = Path(path)
    out = []
    for n, row in read_rows(path, ("prompt", "completion"), GENERATION_FORMAT, "evaluation data", hint):
        out.append(_generation_row(path, n, row, hint))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ConfigError(f"{path}: no examples")
    return out


def _generation_row(path: Path, n: int, row: dict[str, Any], hint: str) -> GenerationRow:
    if "messages" in row:
        return _chat_row(path, n, row["messages"])
    if "prompt" not in row or "completion" not in row:
        raise ConfigError(f"{path}: row {n} has no 'prompt' and 'completion', nor 'messages' "
                          f"(it has {sorted(row)[:6]}){hint}")
    for key in ("prompt", "completion"):
        if not isinstance(row[key], str):
            raise ConfigError(f"{path}: row {n}: '{key}' must be a string")
    if not row["completion"].strip():
        raise ConfigError(f"{path}: row {n}: 'completion' is empty")
    return GenerationRow(n, row["completion"], prompt=row["prompt"])


def _chat_row(path: Path, n: int, messages: Any) -> GenerationRow:
    """The answer is the last message, which must be the assistant's; the ones before it are the prompt."""
    where = f"{path}: row {n}: 'messages'"
    if not isinstance(messages, list) or len(messages) < 2:
        raise ConfigError(f"{where} must be a list of at least two messages (the prompt, then the assistant's answer)")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ConfigError(f"{where}[{i}] must be an object with a string 'role' and a 'content'")
    answer = messages[-1]
    if answer["role"] != "assistant":
        raise ConfigError(f"{where}: the last message is the answer and must have role 'assistant', "
                          f"not {answer['role']!r}")
    if not isinstance(answer["content"], str) or not answer["content"].strip():
        raise ConfigError(f"{where}: the assistant's answer (the last message) must be a non-empty string")
    return GenerationRow(n, answer["content"], messages=tuple(messages[:-1]))


def read_rows(path: Path, csv_columns: Sequence[str], shape: str, what: str = "evaluation data",
              hint: str = "") -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number, object) for each row of a JSONL or CSV file; a CSV header must name `csv_columns`.
    `shape` (the expected keys, in words) and `hint` go into the errors."""
    try:
        if path.stat().st_size > DATA_MAX_BYTES:
            raise ConfigError(f"{path}: larger than {DATA_MAX_BYTES >> 20} MiB; pass a smaller file")
        raw = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path}: not UTF-8 text") from None
    if path.suffix.lower() == ".csv":
        return _csv_rows(raw, path, csv_columns, hint)
    return _jsonl_rows(raw, path, shape)


def _jsonl_rows(raw: str, path: Path, shape: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            raise ConfigError(f"{path}: line {n} is not JSON (JSONL: one object per line)") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}: line {n} is not a JSON object with {shape}")
        yield n, row


def _csv_rows(raw: str, path: Path, columns: Sequence[str], hint: str) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(raw))
    if not reader.fieldnames or not set(columns) <= set(reader.fieldnames):
        raise ConfigError(f"{path}: a CSV file needs a header with {' and '.join(repr(c) for c in columns)} "
                          f"columns{hint}")
    for n, row in enumerate(reader, 2):
        yield n, row
