"""mergekit's YAML in, flexmerge's merge configuration out (docs/mergekit.md).

One document (what `mergekit-yaml` reads) becomes one flexmerge configuration (`from_mergekit`):
the base and tasks its method makes of mergekit's inputs (`translate.tasks_of`), the flexmerge
method and its parameters, and, where mergekit's gradients, filters or slices give tensors
parameters of their own, per-tensor parameters (`tensor_params` rules, one per group of tensors
that resolve alike; `settings` resolves each tensor as mergekit does). Several documents (what
`mergekit-multi` reads) are named stages, run in dependency order (`stage_order`).

What flexmerge does not do is refused in one sentence: what changes the architecture (layer
stacking, mixtures of experts, tokenizer surgery), with the mergekit command to use instead.
"""

from __future__ import annotations

import importlib.util
import json
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexmerge.blocks import layer_of
from flexmerge.errors import ConfigError, FlexMergeError, FlexMergeWarning
from flexmerge.io.open import open_checkpoint
from flexmerge.io.side_files import read_side_files_in, template_of
from flexmerge.mergekit.settings import SPECS, Param, Scope, resolve
from flexmerge.mergekit.translate import FLEXMERGE_METHOD, flexmerge_params, tasks_of
from flexmerge.paths import TASK_NAME

MERGEKIT_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
                 "tokenizer_source", "tokenizer", "chat_template")
MOE_KEYS = ("experts", "gate_mode", "experts_per_token", "shared_experts")
DTYPES = ("float32", "float16", "bfloat16")
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
# The ChatML template as the Hugging Face chat-templating docs write it (mergekit's "chatml"); its
# other named templates are read from an installed mergekit (`named_template`).
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SURGERY = "use mergekit-yaml for it, then merge its output with flexmerge"


def is_mergekit(data: dict[str, Any]) -> bool:
    """A mergekit configuration names its method `merge_method` (flexmerge's says `method`);
    a mergekit-moe one lists `experts`."""
    return "merge_method" in data or any(k in data for k in MOE_KEYS)


def from_mergekit(data: dict[str, Any], root: Path, where: str, flexmerge_keys: Iterable[str],
                  stages: Mapping[str, Path] | None = None) -> dict[str, Any]:
    """The flexmerge config fields of one mergekit document (paths resolved against `root`;
    `stages`: the outputs of earlier stages, by name, which its models may name).

    `flexmerge_keys` are flexmerge's own top-level fields it may add (`size`, `max_bytes`, ...)."""
    extra = set(flexmerge_keys) - set(MERGEKIT_KEYS)
    _refuse_other_architectures(data, where)
    _check_keys(data, extra, where)
    method = data["merge_method"]
    doc = _Document.read(data, root, where, stages or {})
    base, task_refs, models = tasks_of(method, doc.base, doc.inputs, where)
    names = _task_names(task_refs, doc)
    keys = _tensor_names(doc.paths[base], where)
    flex_method = FLEXMERGE_METHOD[method]
    params = _per_tensor_params(method, doc, keys, {ref: names[i] for i, ref in enumerate(task_refs)}, models)
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype is not None:
        params["dtype"] = _dtype(dtype, where)
    out = {k: data[k] for k in extra if k in data}
    out.update(base=doc.paths[base], models={n: doc.paths[r] for n, r in zip(names, task_refs)}, method=flex_method,
               params=params, tokenizer_source=_tokenizer_source(data, doc, where),
               chat_template=_chat_template(data.get("chat_template"), doc, where))
    return out


# --- what flexmerge refuses ---------------------------------------------------------------------


def _refuse_other_architectures(data: dict[str, Any], where: str) -> None:
    """What builds a model of another architecture than its inputs': one sentence, the tool to use."""
    if any(k in data for k in MOE_KEYS) and "merge_method" not in data:
        raise ConfigError(f"{where}: a mergekit-moe config (experts, gate_mode) builds a mixture-of-experts model, "
                          "an architecture its inputs do not have, which flexmerge does not make: use mergekit-moe")
    if data.get("merge_method") == "passthrough":
        what = ("stacks layers of its slices into a model of another depth, an architecture its inputs do not "
                "have" if data.get("slices") else "copies one model (with per-tensor scales): there is nothing to merge")
        raise ConfigError(f"{where}: passthrough {what}; use mergekit-yaml")
    if data.get("modules") is not None:
        raise ConfigError(f"{where}: modules: (a merge per module of a multi-module model) is not supported: give "
                          "whole models under models:, or use mergekit-yaml")


def _check_keys(data: dict[str, Any], extra: set[str], where: str) -> None:
    unknown = [k for k in data if k not in MERGEKIT_KEYS and k not in extra]
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} in a mergekit config; "
                          f"mergekit keys flexmerge reads: {', '.join(MERGEKIT_KEYS)}; flexmerge keys it adds: "
                          f"{', '.join(sorted(extra))}")
    method = data.get("merge_method")
    if method not in SPECS:
        raise ConfigError(f"{where}: unknown merge_method {method!r}; mergekit's: {', '.join(sorted(SPECS))}")
    if bool(data.get("models")) == bool(data.get("slices")):
        raise ConfigError(f"{where}: a mergekit config needs exactly one of `models:` (a list of {{model: PATH, "
                          "parameters: ...}}) and `slices:`")


def _tokenizer_source(data: dict[str, Any], doc: _Document, where: str) -> str:
    """"base" (every export carries the base's tokenizer) or "tasks" (each its own, flexmerge's
    default); other sources build a vocabulary, which flexmerge does not."""
    source, tokens = data.get("tokenizer_source"), None
    if data.get("tokenizer") is not None:
        tok = data["tokenizer"]
        if not isinstance(tok, dict) or set(tok) - {"source", "tokens", "pad_to_multiple_of"}:
            raise ConfigError(f"{where}: tokenizer: must be {{source, tokens, pad_to_multiple_of}}")
        if data.get("tokenizer_source") is not None:
            raise ConfigError(f"{where}: give tokenizer_source or tokenizer:, not both (as mergekit)")
        source, tokens = tok.get("source"), tok.get("tokens") or tok.get("pad_to_multiple_of")
    if source is None:
        return "tasks"
    if source == "base" or (isinstance(source, str) and doc.base is not None and _same_model(source, doc)):
        if tokens:
            raise ConfigError(f"{where}: tokenizer: tokens (single tokens' embeddings taken from other models) and "
                              f"pad_to_multiple_of (rows added to the vocabulary) are tokenizer surgery, which changes "
                              f"the embeddings' rows: {SURGERY}")
        return "base"
    what = ("union (a vocabulary of every model's tokens)" if source == "union"
            else f"{source!r} (another model's vocabulary)")
    raise ConfigError(f"{where}: tokenizer source {what} re-maps every model's embedding rows onto a new vocabulary "
                      f"(tokenizer surgery), which flexmerge does not do: {SURGERY}")


def _same_model(source: str, doc: _Document) -> bool:
    try:
        return doc.path_of(source, "tokenizer_source").resolve() == doc.paths[doc.base].resolve()
    except ConfigError:
        return False


# --- the document: base, inputs, slices ---------------------------------------------------------


@dataclass(frozen=True)
class _Slice:
    """Layers [start, stop) of every model, merged with this slice's parameters (`models:` is one
    slice over all layers); `model_params`: each input's own parameters in it."""

    start: int | None
    stop: int | None
    params: Scope
    model_params: dict[str, Scope]


@dataclass
class _Document:
    """One mergekit document's references resolved: its base (a reference or None), its inputs
    (every model mergekit merges, the base added when not listed, as mergekit adds it), their
    paths, the slices and the config's parameters."""

    base: str | None
    inputs: list[str]
    paths: dict[str, Path]
    slices: list[_Slice]
    params: Scope
    where: str
    root: Path
    stages: Mapping[str, Path]

    @classmethod
    def read(cls, data: dict[str, Any], root: Path, where: str, stages: Mapping[str, Path]) -> _Document:
        doc = cls(None, [], {}, [], _params(data.get("parameters"), "parameters", where), where, root, stages)
        base = data.get("base_model")
        if base is not None:
            doc.base = doc.add(base, "base_model")
        if data.get("models"):
            doc.slices = [doc._models(data["models"])]
        else:
            doc.slices = doc._slices(data["slices"], base)
        if doc.base is not None and doc.base not in doc.inputs:
            doc.inputs.append(doc.base)
        return doc

    def add(self, ref: Any, label: str) -> str:
        """An input reference (its text), its path resolved once."""
        if not isinstance(ref, str) or not ref:
            what = "a mapping (LoRA or architecture overrides)" if isinstance(ref, dict) else repr(ref)
            raise ConfigError(f"{self.where}: {label} is {what}; give a local model path")
        if ref not in self.paths:
            self.paths[ref] = self.path_of(ref, label)
        return ref

    def path_of(self, ref: str, label: str) -> Path:
        if ref in self.stages:
            return self.stages[ref]
        return _model_path(self.root, ref, label, self.where)

    def _models(self, models: Any) -> _Slice:
        if not isinstance(models, list):
            raise ConfigError(f"{self.where}: models: must be a list of {{model: PATH, parameters: ...}}")
        own: dict[str, Scope] = {}
        for i, entry in enumerate(models):
            label = f"models[{i}]"
            if not isinstance(entry, dict) or "model" not in entry or set(entry) - {"model", "parameters"}:
                raise ConfigError(f"{self.where}: {label} must be a mapping {{model: PATH, parameters: ...}}")
            ref = self.add(entry["model"], f"{label}.model")
            if ref in own:
                raise ConfigError(f"{self.where}: {label}: model {ref!r} is listed twice")
            own[ref] = _params(entry.get("parameters"), f"{label}.parameters", self.where)
            self.inputs.append(ref)
        return _Slice(None, None, None, own)

    def _slices(self, slices: Any, base: Any) -> list[_Slice]:
        """`slices:` that take the same layer range from every model, in order and without gaps:
        a whole-model merge whose layers take their slice's parameters. Anything else stitches
        layers of different models or positions into a model of its own (mergekit's business)."""
        if not isinstance(slices, list):
            raise ConfigError(f"{self.where}: slices: must be a list of {{sources: [...]}}")
        out: list[_Slice] = []
        for i, s in enumerate(slices):
            label = f"slices[{i}]"
            if not isinstance(s, dict) or not isinstance(s.get("sources"), list) or not s["sources"] \
                    or set(s) - {"sources", "parameters", "base_model", "residual_weight"}:
                raise ConfigError(f"{self.where}: {label} must be {{sources: [{{model, layer_range}}, ...], "
                                  "parameters: ...}}")
            if s.get("residual_weight") is not None:
                raise ConfigError(f"{self.where}: {label}.residual_weight is not supported")
            if s.get("base_model") is not None and s["base_model"] != base:
                raise ConfigError(f"{self.where}: {label}.base_model differs from base_model; flexmerge merges every "
                                  f"layer against one base: {SURGERY}")
            out.append(self._slice(s, label))
        refs = [list(s.model_params) for s in out]
        if any(r != refs[0] for r in refs):
            raise ConfigError(f"{self.where}: the slices take their layers from different models, which stitches a "
                              f"model out of several (a passthrough-like merge): {SURGERY}")
        stops = [s.stop for s in out]
        if out[0].start != 0 or any(s.start != prev for s, prev in zip(out[1:], stops)):
            ranges = ", ".join(f"[{s.start}, {s.stop}]" for s in out)
            raise ConfigError(f"{self.where}: the slices' layer ranges ({ranges}) do not follow each other from "
                              f"layer 0, which builds a model of other layers than its inputs': {SURGERY}")
        self.inputs.extend(refs[0])
        return out

    def _slice(self, s: dict[str, Any], label: str) -> _Slice:
        ranges, own = [], {}
        for j, src in enumerate(s["sources"]):
            where = f"{label}.sources[{j}]"
            if not isinstance(src, dict) or "model" not in src or set(src) - {"model", "layer_range", "parameters"}:
                raise ConfigError(f"{self.where}: {where} must be {{model, layer_range: [START, END], parameters}}")
            lr = src.get("layer_range")
            if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                  for x in lr) and 0 <= lr[0] < lr[1]):
                raise ConfigError(f"{self.where}: {where}.layer_range must be [START, END] with 0 <= START < END")
            ref = self.add(src["model"], f"{where}.model")
            if ref in own:
                raise ConfigError(f"{self.where}: {where}: model {ref!r} is listed twice in one slice")
            own[ref] = _params(src.get("parameters"), f"{where}.parameters", self.where)
            ranges.append(tuple(lr))
        if len(set(ranges)) > 1:
            raise ConfigError(f"{self.where}: {label} takes different layers from different models "
                              f"({', '.join(f'[{a}, {b}]' for a, b in ranges)}), which moves layers: {SURGERY}")
        return _Slice(ranges[0][0], ranges[0][1], _params(s.get("parameters"), f"{label}.parameters", self.where), own)


def _task_names(refs: list[str], doc: _Document) -> list[str]:
    names: list[str] = []
    for ref in refs:
        names.append(ref if ref in doc.stages and TASK_NAME.fullmatch(ref) else task_name(doc.paths[ref], names))
    return names


def task_name(path: Path, taken: Iterable[str]) -> str:
    """The task name of a model: its folder or file name (checkpoint suffixes dropped), reduced to
    the characters a task name allows ("base", reserved for the base, becomes "base-model"), made
    unique with -2, -3, ..."""
    name = path.name
    for suffix in (".index.json", ".safetensors", ".bin", ".pth", ".pt"):
        name = name.removesuffix(suffix)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).lstrip("._-")[:120] or "model"
    if name == "base":  # the manifest's name of the base model (a model merged as a task too: slerp's, linear's)
        name = "base-model"
    taken = set(taken)
    unique, k = name, 2
    while unique in taken:
        unique, k = f"{name}-{k}", k + 1
    if not TASK_NAME.fullmatch(unique):  # unreachable by construction; a guard for the rule above
        raise ConfigError(f"cannot derive a task name from {path}")
    return unique


def _model_path(root: Path, ref: str, label: str, where: str) -> Path:
    """A local model path; mergekit's Hub ids, `model+lora` and `model@revision` are clear errors."""
    path = root / Path(ref).expanduser()
    if path.exists():
        return path
    if "+" in ref:
        raise ConfigError(f"{where}: {label} {ref!r} applies a LoRA on load (model+lora), which flexmerge does not "
                          "do: merge the adapter into its model first, or give the model's local path")
    if HUB_ID.fullmatch(ref.split("@")[0]) and not ref.startswith(("./", "../")):
        raise ConfigError(f"{where}: {label} {ref!r} is not a local path (a Hugging Face Hub id?); flexmerge reads "
                          "local checkpoints only and never downloads: fetch it first (e.g. `huggingface-cli download "
                          f"{ref.split('@')[0]} --local-dir DIR`) and give DIR")
    raise ConfigError(f"{where}: {label} {ref!r} not found (relative paths are taken from the config's folder, {root})")


def _params(raw: Any, label: str, where: str) -> Scope:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {label} must be a mapping of parameter names to settings")
    return raw


# --- each tensor's parameters -------------------------------------------------------------------


def _tensor_names(base: Path, where: str) -> list[str]:
    """The base's tensor names: what mergekit resolves each parameter for."""
    try:
        return list(open_checkpoint(base).keys())
    except FlexMergeError as e:
        raise ConfigError(f"{where}: base {base}: {e}") from None


def _positions(keys: list[str], slices: list[_Slice], where: str) -> dict[str, tuple[int, float]]:
    """Per tensor: its slice and its t, as mergekit's planner gives them: a layer's t is its place in
    its slice, 0 to 1 (1 alone in one of one layer); other tensors have t = 0 and the first slice's
    parameters (embeddings) or the last's (final norm, output head)."""
    layers: dict[str, int] = {}
    for key in keys:
        if (layer := layer_of(key)) is not None:
            family, index = layer.rsplit(".", 1)
            layers[family] = max(layers.get(family, 0), int(index) + 1)
    if slices[0].start is not None:
        if len(layers) != 1:
            raise ConfigError(f"{where}: slices need a model with one stack of numbered layers, this base has "
                              f"{len(layers)} ({', '.join(layers) or 'none'})")
        if slices[-1].stop != next(iter(layers.values())):
            raise ConfigError(f"{where}: the slices end at layer {slices[-1].stop}, the models have "
                              f"{next(iter(layers.values()))}: slices must cover every layer "
                              f"({SURGERY} to drop layers)")
    out: dict[str, tuple[int, float]] = {}
    for key in keys:
        layer = layer_of(key)
        if layer is None:
            out[key] = (0 if "embed" in key or key.endswith(("wte.weight", "wpe.weight")) else len(slices) - 1, 0.0)
            continue
        family, index = layer.rsplit(".", 1)
        i = int(index)
        s = 0 if slices[0].start is None else next(n for n, sl in enumerate(slices) if sl.start <= i < sl.stop)
        sl = slices[s]
        start, count = (0, layers[family]) if sl.start is None else (sl.start, sl.stop - sl.start)
        out[key] = (s, (i - start) / (count - 1) if count > 1 else 1.0)
    return out


def _check_names(method: str, doc: _Document) -> None:
    """Parameters the method does not read are ignored, as mergekit ignores them (its test configs
    give every method a `weight`), with a warning naming them: a misspelt one is not silent."""
    spec = SPECS[method]
    levels = [("parameters", doc.params, False)]
    for n, s in enumerate(doc.slices):
        levels.append((f"slices[{n}].parameters", s.params, False))
        levels += [(Path(ref).name, p, True) for ref, p in s.model_params.items()]
    ignored: dict[str, list[str]] = {}
    for label, scope, per_model in levels:
        for name in scope or {}:
            if name not in spec or (per_model and spec[name].scope == "shared"):
                ignored.setdefault(name, []).append(label)
    if ignored:
        listed = "; ".join(f"{name} (in {', '.join(labels)})" for name, labels in ignored.items())
        warnings.warn(f"{method} does not read {listed}: ignored, as mergekit ignores it (its parameters: "
                      f"{', '.join(spec) or 'none'})", FlexMergeWarning, stacklevel=2)


def _resolved(method: str, doc: _Document, key: str, at: tuple[int, float], tasks: Mapping[str, str]
              ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """One tensor's shared parameters and each task's own, as mergekit resolves them."""
    spec, (s, t) = SPECS[method], at
    sl = doc.slices[s]
    where = f"{doc.where}: {key}"
    shared = {n: resolve(n, p, (sl.params, doc.params), key, t, where) for n, p in spec.items() if p.scope == "shared"}
    per_task = {}
    for ref, task in tasks.items():
        scopes = (sl.model_params.get(ref), sl.params, doc.params)
        per_task[task] = {n: resolve(n, p, scopes, key, t, where) for n, p in spec.items()
                          if _applies(p, ref, doc.base)}
    return shared, per_task


def _applies(p: Param, ref: str, base: str | None) -> bool:
    return p.scope == "input" or (p.scope == "non_base" and ref != base)


def _per_tensor_params(method: str, doc: _Document, keys: list[str], tasks: Mapping[str, str],
                       models: bool) -> dict[str, Any]:
    """The flexmerge parameters of the tensors most of them share, and `tensor_params` rules
    for the others (one per group of tensors that resolve alike, matching their names)."""
    _check_names(method, doc)
    positions = _positions(keys, doc.slices, doc.where)
    resolved = {k: _resolved(method, doc, k, positions[k], tasks) for k in keys}

    def translate(per_task: bool) -> dict[str, dict[str, Any]]:
        return {k: flexmerge_params(method, *resolved[k], models=models, per_task_form=per_task,
                                    where=f"{doc.where}: {k}") for k in keys}

    by_key = translate(False)
    if len({frozenset(p) for p in by_key.values()}) > 1:
        by_key = translate(True)  # one form for all (per-task values spelt out), so that a rule only changes values
    groups = _groups(by_key)
    (default, _), *others = sorted(groups.values(), key=lambda g: -len(g[1]))
    rules = []
    for params, members in others:
        if params.keys() != default.keys():
            raise ConfigError(f"{doc.where}: the tensors' parameters take different forms ({sorted(default)} and "
                              f"{sorted(params)}), which per-tensor parameters cannot express")
        rules.append({"match": "|".join(map(re.escape, members)),
                      "params": {k: v for k, v in params.items() if default[k] != v}})
    return {**default, **({"tensor_params": rules} if rules else {})}


def _groups(by_key: dict[str, dict[str, Any]]) -> dict[str, tuple[dict[str, Any], list[str]]]:
    """Tensors grouped by their parameters (in the order first seen)."""
    groups: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for key, params in by_key.items():
        groups.setdefault(json.dumps(params, sort_keys=True), (params, []))[1].append(key)
    return groups


def _dtype(name: Any, where: str) -> str:
    text = name.removeprefix("torch.") if isinstance(name, str) else name
    if text not in DTYPES:
        raise ConfigError(f"{where}: dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return text


# --- chat template ------------------------------------------------------------------------------


def _chat_template(value: Any, doc: _Document, where: str) -> str | None:
    """mergekit's `chat_template`: "auto" (the template most of the models carry), one of its named
    templates, or a Jinja template itself (mergekit's rules: a name has no '{' and no newline)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: chat_template must be text: a template name, 'auto' or a Jinja template")
    if value == "auto":
        found = [t for t in (template_of(read_side_files_in(doc.paths[r])) for r in doc.inputs if doc.paths[r].is_dir())
                 if t]
        return Counter(t.strip() for t in found).most_common(1)[0][0] if found else None
    if len(value) < 256 and "\n" not in value and "{" not in value:
        return named_template(value, where)
    if len(value) < 20 or "{" not in value:
        raise ConfigError(f"{where}: invalid chat template {value!r} (mergekit's rule: a Jinja template has '{{' "
                          "and at least 20 characters)")
    return value


def named_template(name: str, where: str = "chat_template") -> str:
    """mergekit's named chat template `name`: ChatML built in, the others (alpaca, llama3, mistral,
    exaone, ...) read from an installed mergekit's data (not imported; flexmerge ships no copy)."""
    if name == "chatml":
        return CHATML
    spec = importlib.util.find_spec("mergekit")
    folders = [Path(p) / "_data" / "chat_templates" for p in (spec.submodule_search_locations or [])] if spec else []
    for folder in folders:
        if (folder / f"{name}.jinja").is_file():
            return (folder / f"{name}.jinja").read_text(encoding="utf-8")
    known = sorted({"chatml", *(p.stem for f in folders if f.is_dir() for p in f.glob("*.jinja"))})
    raise ConfigError(f"{where}: chat template {name!r} is not one flexmerge knows ({', '.join(known)}"
                      f"{'' if spec else '; the others are read from an installed mergekit, not installed here'}); "
                      "give the Jinja template itself")


# --- several documents: mergekit-multi's stages -------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One document of a multi-stage config: its `name` (None: the final, unnamed one), its
    mergekit fields (without `name`) and the earlier stages it names as models."""

    name: str | None
    doc: dict[str, Any]
    needs: tuple[str, ...]


def stage_order(docs: list[dict[str, Any]], where: str) -> list[Stage]:
    """mergekit-multi's documents in the order they run: every stage after those it names as a
    model (base_model, models, slices), an unnamed final stage last. Names are unique; at most one
    document is unnamed; no cycles."""
    stages: dict[str | None, dict[str, Any]] = {}
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict) or not is_mergekit(doc):
            raise ConfigError(f"{where}: document {i + 1} is not a mergekit config: several YAML documents are "
                              "mergekit-multi's stages, each a mergekit config with a `name:`")
        body = {k: v for k, v in doc.items() if k != "name"}
        name = doc.get("name")
        if name is not None and (not isinstance(name, str) or not TASK_NAME.fullmatch(name)):
            raise ConfigError(f"{where}: document {i + 1}: stage name {name!r} must be 1-128 letters, digits, "
                              "'.', '_' or '-'")
        if name in stages:
            raise ConfigError(f"{where}: " + (f"two stages are named {name!r}" if name else "more than one document "
                                              "has no name (mergekit-multi allows one final merge)"))
        stages[name] = body
    needs = {n: tuple(r for r in _references(d) if r in stages and r is not None and r != n) for n, d in stages.items()}
    order: list[Stage] = []
    placing: set[str | None] = set()

    def place(name: str | None) -> None:
        if any(s.name == name for s in order):
            return
        if name in placing:
            raise ConfigError(f"{where}: the stages name each other in a circle (through {name!r})")
        placing.add(name)
        for dep in needs[name]:
            place(dep)
        order.append(Stage(name, stages[name], needs[name]))

    for name in [n for n in stages if n is not None] + ([None] if None in stages else []):
        place(name)
    return order


def _references(doc: dict[str, Any]) -> list[str]:
    """Every model reference of a mergekit document, in order."""
    refs = [doc.get("base_model")]
    refs += [m.get("model") for m in doc.get("models") or [] if isinstance(m, dict)]
    for s in doc.get("slices") or []:
        if isinstance(s, dict):
            refs += [src.get("model") for src in s.get("sources") or [] if isinstance(src, dict)]
    return [r for r in refs if isinstance(r, str)]
