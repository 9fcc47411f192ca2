"""The Hugging Face side files (config, generation config, tokenizer, chat template) an export carries.

A task takes each group of files (`HF_SIDE_GROUPS`) from its own fine-tune when the fine-tune has
any file of the group, and otherwise the whole group from the base: a fine-tune saved without
its tokenizer still exports a loadable directory, and a tokenizer is never assembled from two
directories' files.
"""

from __future__ import annotations

import json
from pathlib import Path

from flexmerge.io.adapters import AdapterSource
from flexmerge.io.source import HF_SIDE_GROUPS, CheckpointSource
from flexmerge.paths import inside

CHAT_TEMPLATE_FILE = "chat_template.jinja"


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


def with_options(files: dict[str, bytes], base: dict[str, bytes], tokenizer_from_base: bool,
                 chat_template: str | None) -> dict[str, bytes]:
    """A task's side files with the merge's options applied: the base's tokenizer group instead of
    its own (`tokenizer_from_base`, mergekit's `tokenizer_source: base`), and `chat_template` as its
    only chat template (chat_template.jinja; one kept inline in tokenizer_config.json is taken out)."""
    out = dict(files)
    if tokenizer_from_base:
        for name in (*HF_SIDE_GROUPS["tokenizer"], *HF_SIDE_GROUPS["chat template"]):
            out.pop(name, None)
        out.update({n: base[n] for n in HF_SIDE_GROUPS["tokenizer"] if n in base})
        out.update(_chat_template(base, inline_too=False))
    if chat_template is not None:
        for name in HF_SIDE_GROUPS["chat template"]:
            out.pop(name, None)
        out[CHAT_TEMPLATE_FILE] = chat_template.encode("utf-8")
        out.update(_without_inline_template(out))
    return out


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
