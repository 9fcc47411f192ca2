"""mergekit's method parameters, and how a setting resolves for one tensor (mergekit 0.1.5).

A setting is a value, a gradient (a list of values, interpolated over the layers of a slice) or
a list of `{filter, value}` conditions (the first whose filter is a substring of the tensor's
name, or has none, or is "*"; its value may be a gradient). A model's own setting comes before its
slice's, then the config's; a setting whose conditions all miss falls through to the next, then
to the parameter's default (`mergekit.config.evaluate_setting`, `parameter_resolver`). Values are
validated as mergekit validates them (pydantic: 1, 1.0 and "1e-5" are floats; true, 1, "yes" bools).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

from flexmerge.errors import ConfigError

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """One parameter of a mergekit method: its type, whom it belongs to ("shared": the merge, one
    per tensor; "input": each model, the base's too; "non_base": each model but the base) and its
    default (REQUIRED: none)."""

    kind: type
    scope: str
    default: Any = REQUIRED

    def check(self, value: Any) -> Any:
        return TypeAdapter(self.kind).validate_python(value)


def _gta(normalize: bool, rescale: bool, **extra: Param) -> dict[str, Param]:
    """The parameters of mergekit's generalized task arithmetic methods."""
    return {"int8_mask": Param(bool, "shared", False), "normalize": Param(bool, "shared", normalize),
            "rescale": Param(bool, "shared", rescale), "lambda": Param(float, "shared", 1.0),
            "weight": Param(float, "non_base"), "density": Param(float, "non_base", 1.0), **extra}


GAMMA = Param(float, "non_base", 0.01)
EPSILON = Param(float, "non_base", 0.15)

# mergekit 0.1.5's registered methods: name -> parameters (`merge_methods/registry.py`, each spec)
SPECS: dict[str, dict[str, Param]] = {
    "task_arithmetic": _gta(normalize=False, rescale=False),
    "ties": _gta(normalize=True, rescale=False),
    "dare_ties": _gta(normalize=False, rescale=True),
    "dare_linear": _gta(normalize=False, rescale=True),
    "breadcrumbs": _gta(normalize=False, rescale=False, gamma=GAMMA),
    "breadcrumbs_ties": _gta(normalize=False, rescale=False, gamma=GAMMA),
    "della": _gta(normalize=True, rescale=True, epsilon=EPSILON),
    "della_linear": _gta(normalize=False, rescale=True, epsilon=EPSILON),
    "linear": {"weight": Param(float, "input"), "normalize": Param(bool, "shared", True)},
    "slerp": {"t": Param(float, "shared")},
    "nearswap": {"t": Param(float, "shared")},
    "arcee_fusion": {},
    "nuslerp": {"weight": Param(float, "non_base"), "nuslerp_row_wise": Param(bool, "shared", False),
                "nuslerp_flatten": Param(bool, "shared", True)},
    "multislerp": {"weight": Param(float, "non_base"), "normalize_weights": Param(bool, "shared", True),
                   "eps": Param(float, "shared", 1e-8)},
    "karcher": {"max_iter": Param(int, "shared", 10), "tol": Param(float, "shared", 1e-5)},
    "model_stock": {"filter_wise": Param(bool, "shared", False)},
    "sce": {"int8_mask": Param(bool, "shared", False), "select_topk": Param(float, "shared", 1.0)},
    "ram": {"epsilon": Param(float, "shared", 1e-5)},
    "ramplus_tl": {"r": Param(float, "shared", 0.1), "alpha": Param(float, "shared", 0.2),
                   "epsilon": Param(float, "shared", 1e-5)},
    "passthrough": {"scale": Param(float | None, "input", None)},
}

Scope = Mapping[str, Any] | None  # one level's `parameters:` (a model's, a slice's, the config's)


def evaluate(setting: Any, tensor: str, t: float, param: Param) -> Any:
    """The value of one setting for `tensor` at position `t` (0..1) of its slice; None when it is a
    list of conditions none of which matches (`mergekit.config.evaluate_setting`)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return param.check(setting)
    if not isinstance(setting, list):
        raise ValueError(f"a setting is a value, a list of values or of {{filter, value}}, got {setting!r}")
    if not setting:
        return None
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        values = [param.check(e) for e in setting]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return param.check((1 - frac) * values[i0] + frac * values[i1])
    for cond in setting:
        if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"filter", "value"}:
            raise ValueError(f"a condition is {{filter: SUBSTRING, value: ...}}, got {cond!r}")
        flt = cond.get("filter")
        if flt is None or flt == "*" or (tensor and str(flt) in tensor):
            return evaluate(cond["value"], tensor, t, param)
    return None


def resolve(name: str, param: Param, scopes: Sequence[Scope], tensor: str, t: float, where: str) -> Any:
    """`name`'s value for `tensor`: the first scope whose setting resolves, else the default."""
    for scope in scopes:
        if scope is not None and name in scope:
            try:
                value = evaluate(scope[name], tensor, t, param)
            except (ValueError, ValidationError) as e:
                first = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
                raise ConfigError(f"{where}: parameter {name!r}: {first}") from None
            if value is not None:
                return value
    if param.default is REQUIRED:
        raise ConfigError(f"{where}: parameter {name!r} is required (mergekit has no default) and is not "
                          f"set for {tensor}")
    return param.default
