"""mergekit's methods as flexmerge's: which input is the base, which are the tasks, and one
tensor's resolved mergekit parameters as the flexmerge method's parameters.

mergekit merges each tensor of its inputs (`models:`, and `base_model` when it is not among them);
how the base takes part is its method's (`InputContract`):
- task-vector methods (TIES, DARE, DELLA, Breadcrumbs, SCE, Model Stock, RAM) need a base and
  merge the others' task vectors: flexmerge's base is it, its tasks the others;
- pairwise ones (slerp, nearswap, arcee_fusion) interpolate the base toward one other model:
  flexmerge's tasks are the base (first) and the other, each merged as a model;
- linear and karcher merge every input as a model, the base too: all are tasks, flexmerge's base
  (what they are stored against) is `base_model`, else the first model;
- nuslerp and multislerp merge task vectors with a base (`space: deltas`), models without one
  (`space: weights`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flexmerge.errors import ConfigError

TASK_VECTORS, PAIR, ALL_MODELS, OPTIONAL_BASE = "task vectors", "pair", "all models", "optional base"
ROLE = {**dict.fromkeys(("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
                         "della", "della_linear", "sce", "model_stock", "ram", "ramplus_tl"), TASK_VECTORS),
        **dict.fromkeys(("slerp", "nearswap", "arcee_fusion"), PAIR),
        **dict.fromkeys(("linear", "karcher"), ALL_MODELS),
        **dict.fromkeys(("nuslerp", "multislerp"), OPTIONAL_BASE)}
# mergekit method -> the flexmerge method that computes it
FLEXMERGE_METHOD = {**{m: m for m in ROLE}, "dare_linear": "dare", "dare_ties": "ties"}

Shared = Mapping[str, Any]  # one tensor's resolved shared parameters
PerTask = Mapping[str, Mapping[str, Any]]  # task name -> its resolved parameters for that tensor


def tasks_of(method: str, base: str | None, inputs: list[str], where: str) -> tuple[str, list[str], bool]:
    """(flexmerge's base, the inputs that are tasks in task order, whether the method merges the
    models' weights) of mergekit's `inputs` (every model it merges, base included when given)."""
    role = ROLE[method]
    if role == OPTIONAL_BASE:
        role = TASK_VECTORS if base is not None else ALL_MODELS
    if role in (TASK_VECTORS, PAIR) and base is None:
        raise ConfigError(f"{where}: {method} needs base_model (mergekit requires one)")
    if role == TASK_VECTORS:
        return base, [i for i in inputs if i != base], False
    if role == PAIR:
        others = [i for i in inputs if i != base]
        if len(others) != 1:
            raise ConfigError(f"{where}: {method} merges base_model with exactly one other model, got {len(others)}"
                              " others (mergekit requires two inputs); for more, use multislerp or karcher")
        return base, [base, others[0]], True
    return (base if base is not None else inputs[0]), list(inputs), True


def flexmerge_params(method: str, shared: Shared, per_task: PerTask, *, models: bool, per_task_form: bool,
                     where: str) -> dict[str, Any]:
    """The flexmerge method's parameters for one tensor. `models`: the tasks are merged as models
    (`tasks_of`); `per_task_form`: the models' values always as per-task parameters (`weights`,
    `task_keep`, `task_dare`), so that every tensor's parameters take one form (else a value
    common to every task is given once, a weight folded into λ)."""
    params = TRANSLATORS[method](method, shared, per_task, per_task_form, where)
    if method in ("nuslerp", "multislerp"):
        params["space"] = "weights" if models else "deltas"
    return params


def _same(name: str, per_task: PerTask, where: str) -> float:
    """A per-model parameter that flexmerge takes once for all tasks: its one value."""
    values = {t: p[name] for t, p in per_task.items() if name in p}
    if len(set(values.values())) > 1:
        listed = ", ".join(f"{t}: {v:g}" for t, v in values.items())
        raise ConfigError(f"{where}: the models' {name} values differ ({listed}); flexmerge takes one {name} for "
                          "every model of a tensor")
    return next(iter(values.values()))


def _weights(per_task: PerTask) -> dict[str, float]:
    return {t: float(p["weight"]) for t, p in per_task.items()}


def _with_weights(params: dict[str, Any], per_task: PerTask, explicit: bool) -> dict[str, Any]:
    """`params` with the models' weights, when any is not 1 (or always, `explicit`)."""
    weights = _weights(per_task)
    if explicit or any(w != 1.0 for w in weights.values()):
        params["weights"] = weights
    return params


def _density(value: float, where: str) -> float:
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"{where}: density must be in (0, 1] (the fraction of entries kept), got {value:g}")
    return value


def _gta(method: str, shared: Shared, per_task: PerTask, explicit: bool, where: str) -> dict[str, Any]:
    """task_arithmetic, dare_linear, ties, dare_ties: mergekit merges θ0 + λ·Σ w_i m_i τ_i' (divided by
    Σ w_i m_i when `normalize`); a weight common to every task folds into λ (or cancels). Per-model
    densities are the trim's per-task keep (ties) or DARE's per-task rate (1 − density)."""
    consensus, dare = method in ("ties", "dare_ties"), method in ("dare_ties", "dare_linear")
    normalize, lam = shared["normalize"], shared["lambda"]
    _check_rescale(method, dare, consensus, shared["rescale"], where)
    weights = _weights(per_task)
    common = next(iter(weights.values())) if len(set(weights.values())) == 1 and not explicit else None
    params: dict[str, Any] = {"lam": lam if normalize or common is None else lam * common}
    if common is None:
        params["weights"] = weights
    if consensus:
        params["combine"] = "mean" if normalize else "sum"
    else:
        params["convention"] = "mean" if normalize else "sum"
    if consensus or dare:
        densities = {t: _density(float(p["density"]), where) for t, p in per_task.items()}
        one = len(set(densities.values())) == 1 and not explicit
        if dare:  # 1 - 0.7 is 0.30000000000000004
            rates = {t: round(1.0 - d, 12) for t, d in densities.items()}
            params["dare"] = max(rates.values())
            if not one:
                params["task_dare"] = rates
        if consensus and dare:
            params["keep"] = 1.0  # no magnitude trim
        elif consensus:  # mergekit's `magnitude`: int(density·numel) entries of each tensor
            params.update(keep=min(densities.values()), trim="floor", trim_scope="tensor")
            if not one:
                params["task_keep"] = densities
    return params


def _check_rescale(method: str, dare: bool, consensus: bool, rescale: bool, where: str) -> None:
    """mergekit's `rescale` renormalizes each sparsified tensor's L1 norm. flexmerge's DARE rescales by
    1/density (DARE's rule, equal in expectation); its TIES never rescales."""
    if dare and not rescale:
        raise ConfigError(f"{where}: {method} with rescale: false (DARE drops without rescaling) is not supported; "
                          "flexmerge's DARE rescales the kept entries by 1/density: remove rescale or set it true")
    if consensus and not dare and rescale:
        raise ConfigError(f"{where}: ties with rescale: true (L1 renormalization after trimming) is not supported: "
                          "remove rescale or set it false")


def _sparse(method: str, shared: Shared, per_task: PerTask, explicit: bool, where: str) -> dict[str, Any]:
    """breadcrumbs(_ties), della(_linear): one density (and gamma / epsilon) for all tasks of a tensor."""
    params: dict[str, Any] = {"density": _density(_same("density", per_task, where), where),
                              "lam": shared["lambda"], "normalize": shared["normalize"]}
    if method.startswith("breadcrumbs"):
        params["gamma"] = _same("gamma", per_task, where)
        if shared["rescale"]:
            raise ConfigError(f"{where}: {method} with rescale: true is not supported: remove rescale or set it false")
    else:
        params["epsilon"] = _same("epsilon", per_task, where)
        params["rescale"] = shared["rescale"]
    return _with_weights(params, per_task, explicit)


def _shared_only(*names: str, weighted: bool = False) -> Callable[..., dict[str, Any]]:
    """Methods whose parameters map one to one (and, `weighted`, take the models' weights)."""
    def translate(method: str, shared: Shared, per_task: PerTask, explicit: bool, where: str) -> dict[str, Any]:
        params = {n: shared[n] for n in names}
        return _with_weights(params, per_task, explicit) if weighted else params
    return translate


TRANSLATORS: dict[str, Callable[..., dict[str, Any]]] = {
    **dict.fromkeys(("task_arithmetic", "ties", "dare_ties", "dare_linear"), _gta),
    **dict.fromkeys(("breadcrumbs", "breadcrumbs_ties", "della", "della_linear"), _sparse),
    "linear": _shared_only("normalize", weighted=True),
    "slerp": _shared_only("t"),
    "nearswap": _shared_only("t"),
    "arcee_fusion": _shared_only(),
    "nuslerp": _shared_only("nuslerp_row_wise", "nuslerp_flatten", weighted=True),
    "multislerp": _shared_only("normalize_weights", "eps", weighted=True),
    "karcher": _shared_only("max_iter", "tol"),
    "model_stock": _shared_only("filter_wise"),
    "sce": _shared_only("select_topk"),
    "ram": _shared_only("epsilon"),
    "ramplus_tl": _shared_only("r", "alpha", "epsilon"),
}
