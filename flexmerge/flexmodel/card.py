"""The model card (README.md) of an export: what the model is, how it was merged, how to redo it.

What a card may name. A card is meant to be shared, so it never holds a local path: the base is
named by the Hub id its config records (`_name_or_path`, when that is a Hub-style id and not a
path on this machine), or else by its folder (or file) name alone; models by their folder or
file names. Everything taken from an artifact's manifest is untrusted text: names are reduced to
a safe character set, and the YAML is written by `yaml.safe_dump` inside a fence it cannot close.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from flexmerge.io.source import HF_WEIGHT_FILES, CheckpointSource

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")
HF_SHARD = re.compile(r"(model|pytorch_model)-\d{5}-of-\d{5}\.(safetensors|bin)")
_UNSAFE = re.compile(r"[^A-Za-z0-9._/-]+")


def input_names(base: CheckpointSource, tasks: dict[str, CheckpointSource]) -> dict[str, Any]:
    """The names a card gives the inputs (see the module docstring), recorded in the manifest at merge time."""
    return {"base": base_model_name(base), "models": {t: local_name(src) for t, src in tasks.items()}}


def base_model_name(src: CheckpointSource) -> str:
    """The base's Hub id from its config's `_name_or_path`, else its folder or file name only."""
    recorded = _name_or_path(src.hf_dir) if src.hf_dir is not None else ""
    if recorded and HUB_ID.fullmatch(recorded) and ".." not in recorded and not Path(recorded).exists():
        return recorded
    return local_name(src)


def local_name(src: CheckpointSource) -> str:
    """A model's folder name (a Hugging Face directory) or file name: never the path above it."""
    path = Path(src.hf_dir if src.hf_dir is not None else src.path)
    return safe_name(path.resolve().name if path.name in ("", ".", "..") else path.name)


def name_from_file(file: str) -> str:
    """`local_name` for artifacts written before names were recorded: from an input file's path."""
    p = Path(file)
    return safe_name(p.parent.name if p.name in HF_WEIGHT_FILES or HF_SHARD.fullmatch(p.name) else p.name)


def safe_name(text: object) -> str:
    """`text` in the characters of a path or Hub id, at most 128 of them (untrusted text in, inert text out)."""
    cleaned = _UNSAFE.sub("_", str(text)).strip("/")[:128]
    return cleaned or "model"


def _name_or_path(hf_dir: Path) -> str:
    try:
        config = json.loads((hf_dir / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return ""
    value = config.get("_name_or_path") if isinstance(config, dict) else None
    return value if isinstance(value, str) else ""


def card_names(info: dict[str, Any], tasks: list[str]) -> tuple[str, dict[str, str]]:
    """(base name, {task: model name}) from a manifest's info: recorded, or derived from input paths."""
    names = info.get("names") if isinstance(info.get("names"), dict) else {}
    inputs = info.get("inputs") if isinstance(info.get("inputs"), dict) else {}

    def from_inputs(key: str) -> str:
        files = inputs.get(key, {}).get("files") if isinstance(inputs.get(key), dict) else None
        first = files[0].get("file") if isinstance(files, list) and files and isinstance(files[0], dict) else None
        return name_from_file(first) if isinstance(first, str) else key

    models = names.get("models") if isinstance(names.get("models"), dict) else {}
    base = safe_name(names["base"]) if isinstance(names.get("base"), str) else from_inputs("base")
    return base, {t: safe_name(models[t]) if isinstance(models.get(t), str) else from_inputs(t) for t in tasks}


def reproduce_config(flex, base: str, models: dict[str, str]) -> dict[str, Any]:
    """The `flexmerge merge --config` fields that rebuild the artifact (paths: the inputs' names)."""
    options = flex.info.get("plan_options") if isinstance(flex.info.get("plan_options"), dict) else {}
    config: dict[str, Any] = {"base": base, "models": dict(models), "method": safe_name(flex.method.get("name")),
                              "params": {safe_name(k): v for k, v in flex.method.items() if k != "name"},
                              "granularity": flex.partition.granularity}
    if isinstance(flex.info.get("planner"), str):
        config["planner"] = safe_name(flex.info["planner"])
    for key in ("linkage", "mode", "measure", "seed"):
        if isinstance(options.get(key), (str, int)) and not isinstance(options.get(key), bool):
            config[key] = options[key] if isinstance(options[key], int) else safe_name(options[key])
    requested = flex.info.get("requested_size")
    config["size"] = requested if isinstance(requested, (int, float)) and not isinstance(requested, bool) else flex.size
    return config


def sharing_rows(flex, task: str) -> list[tuple[str, int, list[str]]]:
    """Per distinct set of other tasks `task` shares a block with: (those tasks, blocks, block names)."""
    names = flex.partition.names()
    by_group: dict[tuple[str, ...], list[str]] = {}
    for block, group in zip(names, flex.groups_of(task)):
        by_group.setdefault(tuple(t for t in group if t != task), []).append(block)
    counts = Counter({g: len(b) for g, b in by_group.items()})
    return [(", ".join(g) if g else "(its own copy)", n, by_group[g]) for g, n in counts.most_common()]


def model_card(flex, task: str, *, library: str | None, out_dtype: str | None) -> str:
    """README.md of `task`'s export: YAML front matter (base_model, tags, library_name) and a body
    with the method, its parameters, the size, what the task shares per block, and the config."""
    base, models = card_names(flex.info, flex.tasks)
    front: dict[str, Any] = {"base_model": base, "tags": ["merge", "flexmerge"]}
    if library:
        front["library_name"] = library
    method = safe_name(flex.method.get("name"))
    others = [t for t in flex.tasks if t != task]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             f"# {task}: a FlexMerge export", "",
             f"Task `{task}`'s model from a FlexMerge (Dhasade et al., ICLR 2026) artifact that "
             f"merges {len(flex.tasks)} fine-tunes of `{base}` (`{task}`, " + ", ".join(f"`{t}`" for t in others)
             + f") with `{method}` into one artifact of size **{flex.size:.3f}x** (1x: one model's mergeable "
             f"parameters; {len(flex.tasks)}x: every fine-tune stored whole).", "",
             "## Merge", "", "| | |", "|---|---|", f"| method | `{method}` |"]
    lines += [f"| {safe_name(k)} | `{_inline(v)}` |" for k, v in flex.method.items() if k != "name"]
    lines += [f"| size | {flex.size:.4f}x ({flex.stored_bytes()} bytes in blocks; one model = {flex.unit_bytes} bytes) |",
              f"| blocks | {len(flex.partition)} ({_inline(flex.partition.granularity)}) |"]
    if out_dtype:
        lines.append(f"| exported as | {out_dtype} |")
    lines += ["", f"## What `{task}` shares", "",
              f"Per block, the tasks whose weights `{task}` reads from one stored copy:", "",
              "| shared with | blocks | e.g. |", "|---|---|---|"]
    for group, n, blocks in sharing_rows(flex, task):
        example = ", ".join(f"`{_inline(b)}`" for b in blocks[:3]) + (", ..." if len(blocks) > 3 else "")
        lines.append(f"| {group} | {n} | {example} |")
    config = yaml.safe_dump(reproduce_config(flex, base, models), sort_keys=False).rstrip()
    fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", config)), default=0))
    lines += ["", "## Reproduce", "",
              "Put your local copies of the models at these paths (a card records names, never local paths), then",
              f"`flexmerge merge --config merge.yaml --out flex && flexmerge export flex --task {task} --out {task}/`:",
              "", f"{fence}yaml", "# merge.yaml", config, fence, ""]
    return "\n".join(lines)


def _inline(value: object) -> str:
    """A value as one line of markdown table text (no backticks, pipes or line breaks to break out of it)."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return re.sub(r"[`|\r\n<>]", " ", text)[:200]
