"""mergekit's YAML in, flexmerge's merge configuration out, for the methods both have.

mergekit (arcee-ai/mergekit, `merge_methods/generalized_task_arithmetic.py`) merges, per tensor,
`θ0 + λ · Σ_i w_i m_i τ_i'` where τ_i' is τ_i sparsified (TIES: top `density` magnitudes; DARE:
random keep with probability `density`), m_i the sign-consensus mask (TIES variants), divided by
`Σ_i w_i m_i` when `normalize`. Unequal weights are the method's per-task `weights`; with equal
weights w, that is flexmerge's

| mergekit | flexmerge |
|---|---|
| task_arithmetic | task_arithmetic, convention mean (normalize) or sum with lam = λ·w |
| dare_linear | dare, dare = 1 − density, convention as above |
| ties | ties, keep = density per tensor (trim floor, trim_scope tensor), combine mean (normalize) or sum, lam = λ·w |
| dare_ties | ties, keep = 1, dare = 1 − density, combine as above |

Anything flexmerge would compute differently, or not at all, is an error naming it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flexmerge.errors import ConfigError
from flexmerge.paths import TASK_NAME

# method -> (flexmerge method, TIES-style sign consensus, DARE drops, default normalize)
METHODS = {"task_arithmetic": ("task_arithmetic", False, False, False),
           "dare_linear": ("dare", False, True, False),
           "ties": ("ties", True, False, True),
           "dare_ties": ("ties", True, True, False)}
MERGEKIT_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype")
REFUSED = {
    "slices": "slices (layers stitched from ranges of several models) are not a flexmerge merge: "
              "give whole models under `models:`",
    "modules": "modules (a merge per named module) are not supported: give whole models under `models:`",
    "tokenizer_source": "tokenizer surgery (tokenizer_source) is not supported: every task keeps its "
                        "fine-tune's tokenizer (or the base's) in its export",
    "tokenizer": "tokenizer surgery (tokenizer:) is not supported: every task keeps its fine-tune's "
                 "tokenizer (or the base's) in its export",
    "chat_template": "chat_template is not supported: every task's export carries its fine-tune's "
                     "chat template (or the base's)",
}
GLOBAL_PARAMS = ("weight", "density", "normalize", "lambda", "rescale", "int8_mask")
MODEL_PARAMS = ("weight", "density")
DTYPES = ("float32", "float16", "bfloat16")
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def is_mergekit(data: dict[str, Any]) -> bool:
    """A mergekit configuration names its method `merge_method` (flexmerge's says `method`)."""
    return "merge_method" in data


def from_mergekit(data: dict[str, Any], root: Path, where: str, flexmerge_keys: Iterable[str]) -> dict[str, Any]:
    """The flexmerge config fields (paths resolved against `root`) of a mergekit YAML document.

    `flexmerge_keys` are flexmerge's own top-level fields it may add (`size`, `max_bytes`, ...)."""
    extra = set(flexmerge_keys)
    _check_keys(data, extra, where)
    method = data["merge_method"]
    if method not in METHODS:
        raise ConfigError(f"{where}: mergekit merge_method {method!r} has no flexmerge equivalent; "
                          f"supported: {', '.join(METHODS)}")
    target, consensus, dare, default_normalize = METHODS[method]
    if data.get("base_model") is None:
        raise ConfigError(f"{where}: {method} needs base_model: the model the others were fine-tuned from")
    base = _model_path(root, data["base_model"], "base_model", where)
    entries = _model_entries(data.get("models"), where)
    glob = _params(data.get("parameters"), GLOBAL_PARAMS, "parameters", where)
    models, per_model = _task_models(root, base, entries, where)
    weights = _values("weight", per_model, glob, None, where)
    weight = next(iter(weights.values())) if len(set(weights.values())) == 1 else None  # one for all
    density = _one_value("density", per_model, glob, 1.0, where) if consensus or dare else 1.0  # else unused
    normalize = _flag(glob, "normalize", default_normalize, where)
    rescale = _flag(glob, "rescale", dare, where)
    _flag(glob, "int8_mask", False, where)  # the mask's dtype in memory: no effect on the result
    lam = _number(glob.get("lambda", 1.0), "parameters.lambda", where)
    if weight == 0:
        raise ConfigError(f"{where}: weight 0 merges nothing; give the models a non-zero weight")
    # One weight for all folds into λ (normalize: it cancels); unequal ones are the method's per-task weights.
    params: dict[str, Any] = {"lam": lam if normalize or weight is None else lam * weight}
    if weight is None:
        params["weights"] = weights
    if consensus:
        params["combine"] = "mean" if normalize else "sum"
        params["keep"] = 1.0 if dare else _fraction(density, "density", where)
        if not dare and params["keep"] < 1.0:  # mergekit's `magnitude`: int(density·numel) entries per tensor
            params.update(trim="floor", trim_scope="tensor")
    else:
        params["convention"] = "mean" if normalize else "sum"
    if dare:
        params["dare"] = round(1.0 - _fraction(density, "density", where), 12)  # 1 - 0.7 is 0.30000000000000004
    _check_rescale(method, dare, consensus, rescale, where)
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype is not None:
        params["dtype"] = _dtype(dtype, where)
    out = {k: data[k] for k in extra if k in data}
    return {**out, "base": base, "models": models, "method": target, "params": params}


def _check_keys(data: dict[str, Any], extra: set[str], where: str) -> None:
    for key, why in REFUSED.items():
        if data.get(key) is not None:
            raise ConfigError(f"{where}: {why}")
    unknown = [k for k in data if k not in MERGEKIT_KEYS and k not in extra]
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} in a mergekit config; "
                          f"mergekit keys flexmerge reads: {', '.join(MERGEKIT_KEYS)}; flexmerge keys it adds: "
                          f"{', '.join(sorted(extra))}")
    if not isinstance(data.get("models"), list) or not data["models"]:
        raise ConfigError(f"{where}: a mergekit config needs `models:`, a list of {{model: PATH, parameters: ...}}")


def _model_entries(models: list[Any], where: str) -> list[tuple[str, Any, dict[str, Any]]]:
    """(what to call it in errors, its reference, its parameters) per entry of `models:`."""
    out = []
    for i, entry in enumerate(models):
        label = f"models[{i}]"
        if not isinstance(entry, dict) or "model" not in entry:
            raise ConfigError(f"{where}: {label} must be a mapping with a `model:` key")
        unknown = [k for k in entry if k not in ("model", "parameters")]
        if unknown:
            raise ConfigError(f"{where}: {label} has key(s) {', '.join(map(repr, unknown))}; flexmerge reads "
                              "`model` and `parameters` (weight, density)")
        out.append((label, entry["model"], _params(entry.get("parameters"), MODEL_PARAMS, f"{label}.parameters", where)))
    return out


def _task_models(root: Path, base: Path, entries, where: str) -> tuple[dict[str, Path], dict[str, dict[str, Any]]]:
    """{task name: path} and {task name: parameters}; an entry that is the base is skipped, as mergekit does."""
    models: dict[str, Path] = {}
    params: dict[str, dict[str, Any]] = {}
    for label, ref, p in entries:
        path = _model_path(root, ref, f"{label}.model", where)
        if path.resolve() == base.resolve():
            continue
        name = task_name(path, models)
        models[name], params[name] = path, p
    return models, params


def task_name(path: Path, taken: Iterable[str]) -> str:
    """The task name of a model: its folder or file name (checkpoint suffixes dropped), reduced to
    the characters a task name allows, made unique with -2, -3, ..."""
    name = path.name
    for suffix in (".index.json", ".safetensors", ".bin", ".pth", ".pt"):
        name = name.removesuffix(suffix)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).lstrip("._-")[:120] or "model"
    taken = set(taken)
    unique, k = name, 2
    while unique in taken:
        unique, k = f"{name}-{k}", k + 1
    if not TASK_NAME.fullmatch(unique):  # unreachable by construction; a guard for the rule above
        raise ConfigError(f"cannot derive a task name from {path}")
    return unique


def _model_path(root: Path, ref: Any, label: str, where: str) -> Path:
    """A local model path; mergekit's Hub ids, `model+lora` and `model@revision` are clear errors."""
    if not isinstance(ref, str) or not ref:
        what = "a mapping (LoRA or architecture overrides)" if isinstance(ref, dict) else repr(ref)
        raise ConfigError(f"{where}: {label} is {what}; give a local model path")
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


def _params(raw: Any, allowed: tuple[str, ...], label: str, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {label} must be a mapping of parameter names to values")
    unknown = [k for k in raw if k not in allowed]
    if unknown:
        raise ConfigError(f"{where}: {label}: parameter(s) {', '.join(map(repr, unknown))} not supported; "
                          f"flexmerge reads {', '.join(allowed)} here")
    for k, v in raw.items():
        if isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            raise ConfigError(f"{where}: {label}.{k} is a gradient (a list of values over the layers); flexmerge "
                              "takes one value per model")
        if isinstance(v, (list, dict)):
            raise ConfigError(f"{where}: {label}.{k} holds per-tensor values (filter/value); flexmerge takes one "
                              "value per model")
    return raw


def _values(name: str, per_model: dict[str, dict[str, Any]], glob: dict[str, Any], default: float | None,
            where: str) -> dict[str, float]:
    """Each task's value of a per-model parameter (its own, else the global one, else `default`)."""
    values = {}
    for task, p in per_model.items():
        value = p.get(name, glob.get(name, default))
        if value is None:
            raise ConfigError(f"{where}: model {task!r} has no {name}; mergekit requires parameters.{name}")
        values[task] = _number(value, f"{task}'s {name}", where)
    return values


def _one_value(name: str, per_model: dict[str, dict[str, Any]], glob: dict[str, Any], default: float | None,
               where: str) -> float:
    """The one value of a per-model parameter (a model's own, else the global one, else `default`)."""
    values = _values(name, per_model, glob, default, where)
    distinct = set(values.values())
    if len(distinct) > 1:
        listed = ", ".join(f"{t}: {v:g}" for t, v in values.items())
        raise ConfigError(f"{where}: the models' {name} values differ ({listed}); flexmerge's methods take one "
                          f"{name} for every task: give them one {name}")
    return distinct.pop() if distinct else float(default or 0.0)


def _number(value: Any, label: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        raise ConfigError(f"{where}: {label} must be a finite number, got {value!r}")
    return float(value)


def _fraction(value: float, label: str, where: str) -> float:
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"{where}: {label} must be in (0, 1] (the fraction of entries kept), got {value:g}")
    return value


def _flag(glob: dict[str, Any], name: str, default: bool, where: str) -> bool:
    value = glob.get(name, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: parameters.{name} must be true or false, got {value!r}")
    return value


def _check_rescale(method: str, dare: bool, consensus: bool, rescale: bool, where: str) -> None:
    """mergekit's `rescale` renormalizes each sparsified tensor's L1 norm. flexmerge's DARE rescales by
    1/density (DARE's rule, equal in expectation); its TIES never rescales."""
    if dare and not rescale:
        raise ConfigError(f"{where}: {method} with rescale: false (DARE drops without rescaling) is not supported; "
                          "flexmerge's DARE rescales the kept entries by 1/density: remove rescale or set it true")
    if consensus and not dare and rescale:
        raise ConfigError(f"{where}: ties with rescale: true (L1 renormalization after trimming) is not supported: "
                          "remove rescale or set it false")


def _dtype(name: Any, where: str) -> str:
    text = name.removeprefix("torch.") if isinstance(name, str) else name
    if text not in DTYPES:
        raise ConfigError(f"{where}: dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return text
