"""The Hugging Face side files (config, generation config, tokenizer, chat template) an export carries.

A task takes each group of files (`HF_SIDE_GROUPS`) from its own fine-tune when the fine-tune has
any file of the group, and otherwise the whole group from the base: a fine-tune saved without
its tokenizer still exports a loadable directory, and a tokenizer is never assembled from two
directories' files.
"""

from __future__ import annotations

import json
from pathlib import Path

from flexmerge.errors import CheckpointError
from flexmerge.io.adapters import AdapterSource
from flexmerge.io.source import HF_SIDE_GROUPS, CheckpointSource
from flexmerge.paths import inside

CHAT_TEMPLATE_FILE = "chat_template.jinja"
# the largest tokenizer.json read for its vocabulary (an artifact's side file limit)
MAX_TOKENIZER_JSON = 64 << 20


def read_hf_side_files(src: CheckpointSource) -> dict[str, bytes]:
    """The side files of a Hugging Face input directory (none for a plain checkpoint file).

    A side file must lie inside its model directory once symlinks are resolved, or beside the
    file its weights really are (a Hugging Face cache snapshot links both into `blobs/`)."""
    if src.hf_dir is None:
        return {}
    return read_side_files_in(src.hf_dir, also=Path(src.path).resolve().parent)


def own_side_files(src: CheckpointSource) -> dict[str, bytes]:
    """The side files of a fine-tune's own directory: a PEFT adapter's are those its adapter
    directory holds (a config with the task's own labels, a tokenizer with added tokens), not its base's."""
    if isinstance(src, AdapterSource):
        return read_side_files_in(src.path, also=src.path.resolve())
    return read_hf_side_files(src)


def side_groups(files: dict[str, bytes]) -> set[str]:
    """The groups of `HF_SIDE_GROUPS` that `files` hold any file of."""
    return {group for group, names in HF_SIDE_GROUPS.items() if any(n in files for n in names)}


def read_side_files_in(directory: Path, also: Path | None = None) -> dict[str, bytes]:
    """The side files `directory` holds, each inside it (or `also`) once symlinks are resolved."""
    return {f: inside(directory, f, "side file", also=also).read_bytes()
            for group in HF_SIDE_GROUPS.values() for f in group if (directory / f).is_file()}


def pick_side_files(own: dict[str, bytes], base: dict[str, bytes]) -> dict[str, bytes]:
    """Each group from `own` (the task's fine-tune) when it has one, else from `base`."""
    out: dict[str, bytes] = {}
    for group, names in HF_SIDE_GROUPS.items():
        if group != "chat template":
            source = own if any(n in own for n in names) else base
            out.update({n: source[n] for n in names if n in source})
    templates = own if _has_chat_template(own) else base
    out.update(_chat_template(templates, inline_too=out.get("tokenizer_config.json") != templates.get(
        "tokenizer_config.json")))
    return out


def template_of(files: dict[str, bytes]) -> str | None:
    """The chat template that side `files` carry (chat_template.jinja, or kept inline in
    tokenizer_config.json), None when they carry none (or only a multi-template chat_template.json)."""
    if CHAT_TEMPLATE_FILE in files:
        return files[CHAT_TEMPLATE_FILE].decode("utf-8", errors="replace")
    inline = _inline_template(files)
    return inline if isinstance(inline, str) and inline else None


def token_ids(files: dict[str, bytes], where: str) -> dict[str, int] | None:
    """Each token's id in the tokenizer.json among side `files` (its model's vocabulary, then its
    added tokens, as `get_vocab` gives them); None without a tokenizer.json. `where` names the
    files in an error."""
    data = files.get("tokenizer.json")
    if data is None:
        return None
    if len(data) > MAX_TOKENIZER_JSON:
        raise CheckpointError(f"{where}: tokenizer.json holds {len(data)} bytes, more than a tokenizer's "
                              f"{MAX_TOKENIZER_JSON} flexmerge reads")
    try:
        tokenizer = json.loads(data)
        vocab = (tokenizer.get("model") or {}).get("vocab") or {}
        ids = ({str(t): int(i) for t, i in vocab.items()} if isinstance(vocab, dict)  # BPE, WordPiece, WordLevel
               else {str(entry[0]): i for i, entry in enumerate(vocab)})  # Unigram: [piece, score] in id order
        ids.update({str(t["content"]): int(t["id"]) for t in tokenizer.get("added_tokens") or ()})
    except (ValueError, RecursionError, TypeError, AttributeError, KeyError, IndexError) as e:
        raise CheckpointError(f"{where}: tokenizer.json is not a readable tokenizer ({type(e).__name__}: {e})") from None
    return ids


def moved_token(base: dict[str, int], task: dict[str, int]) -> str | None:
    """The first base token that `task`'s vocabulary lacks or gives another id, said in words."""
    for token, i in base.items():
        if task.get(token) != i:
            where = "lacks it" if token not in task else f"gives it id {task[token]}"
            return f"the base gives {token!r} id {i}, the task's tokenizer {where}"
    return None


def with_options(files: dict[str, bytes], base: dict[str, bytes], tokenizer_from_base: bool,
                 chat_template: str | None) -> dict[str, bytes]:
    """A task's side files with the merge's options applied: the base's tokenizer group instead of
    its own and the base's vocab_size in its config (`tokenizer_from_base`, mergekit's
    `tokenizer_source: base`: the weights hold the base's vocabulary), and `chat_template` as its
    only chat template (chat_template.jinja; one kept inline in tokenizer_config.json is taken out)."""
    out = dict(files)
    if tokenizer_from_base:
        for name in (*HF_SIDE_GROUPS["tokenizer"], *HF_SIDE_GROUPS["chat template"]):
            out.pop(name, None)
        out.update({n: base[n] for n in HF_SIDE_GROUPS["tokenizer"] if n in base})
        out.update(_chat_template(base, inline_too=False))
        out.update(_with_vocab_size(out, base))
    if chat_template is not None:
        for name in HF_SIDE_GROUPS["chat template"]:
            out.pop(name, None)
        out[CHAT_TEMPLATE_FILE] = chat_template.encode("utf-8")
        out.update(_without_inline_template(out))
    return out


def _with_vocab_size(files: dict[str, bytes], base: dict[str, bytes]) -> dict[str, bytes]:
    """config.json with the base's vocab_size (rewritten only when the two differ)."""
    config, base_config = _json_object(files.get("config.json")), _json_object(base.get("config.json"))
    if config is None or base_config is None or "vocab_size" not in base_config:
        return {}
    if config.get("vocab_size") == base_config["vocab_size"]:
        return {}
    config["vocab_size"] = base_config["vocab_size"]
    return {"config.json": (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")}


def _json_object(data: bytes | None) -> dict | None:
    """A side file's JSON object; None when absent or not one (the export then carries it as it is)."""
    if data is None:
        return None
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _without_inline_template(files: dict[str, bytes]) -> dict[str, bytes]:
    """tokenizer_config.json without its `chat_template` field (rewritten only when it has one)."""
    if not _inline_template(files):
        return {}
    config = json.loads(files["tokenizer_config.json"])
    del config["chat_template"]
    return {"tokenizer_config.json": (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")}


def _inline_template(files: dict[str, bytes]) -> object:
    """The `chat_template` field of tokenizer_config.json (older transformers keep it there)."""
    try:
        config = json.loads(files.get("tokenizer_config.json", b"{}"))
    except (ValueError, RecursionError):  # an unreadable config carries no template
        return None
    return config.get("chat_template") if isinstance(config, dict) else None


def _has_chat_template(files: dict[str, bytes]) -> bool:
    return any(n in files for n in HF_SIDE_GROUPS["chat template"]) or bool(_inline_template(files))


def _chat_template(files: dict[str, bytes], inline_too: bool) -> dict[str, bytes]:
    """A directory's chat-template files; with `inline_too` (its tokenizer_config.json is not the
    one exported), a template kept inline as one string becomes chat_template.jinja, which the
    tokenizer loads beside the exported tokenizer_config.json."""
    found = {n: files[n] for n in HF_SIDE_GROUPS["chat template"] if n in files}
    inline = _inline_template(files)
    if inline_too and not found and isinstance(inline, str) and inline:
        found[CHAT_TEMPLATE_FILE] = inline.encode()
    return found
