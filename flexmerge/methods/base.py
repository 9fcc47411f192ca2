"""The merging-method interface and its registry.

A method sees the task vectors of one group's members on one block, flattened to (n, D) fp32,
and returns what is stored for the group. Global per-task preprocessing (TIES trimming, DARE)
is declared by `transforms()` and applied before planning and merging.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flexmerge.blocks import PartView
from flexmerge.device import to_host
from flexmerge.errors import ConfigError, UnknownNameError
from flexmerge.preprocess import DareDrop, PerTensor, Pipeline, TopKTrim, Transform


# One member's residual on one tensor: (A, B) low-rank factors with residual = A @ B, or (R,) exactly.
Residual = tuple[torch.Tensor, ...]


@dataclass
class GroupResult:
    """What one group stores: a merged task vector, for mask methods per-member masks/scales, and
    for residual methods (Twin-Merging) per member, per tensor of the block, its residual."""

    delta: torch.Tensor  # (D,) fp32
    masks: torch.Tensor | None = None  # (n, D) bool
    scales: torch.Tensor | None = None  # (n,) fp32
    residuals: list[list[Residual]] | None = None  # [member][part]

    @staticmethod
    def concat(parts: list["GroupResult"]) -> "GroupResult":
        """Join the results of consecutive chunks of a block (elementwise methods)."""
        masks = torch.cat([p.masks for p in parts], 1) if parts[0].masks is not None else None
        return GroupResult(torch.cat([p.delta for p in parts]), masks, parts[0].scales)

    def to_host(self) -> "GroupResult":
        """This result in host memory (merging may have run on a GPU); on the CPU, itself."""
        host = lambda t: None if t is None else to_host(t)  # noqa: E731
        residuals = None if self.residuals is None else [[tuple(map(to_host, r)) for r in member]
                                                         for member in self.residuals]
        return GroupResult(to_host(self.delta), host(self.masks), host(self.scales), residuals)

    def task_delta(self, i: int) -> torch.Tensor:
        """The task vector that member i of the group reads."""
        if self.masks is None:
            return self.delta
        d = self.delta * self.masks[i]
        return d * self.scales[i] if self.scales is not None else d


# A block streamed to a method: consecutive (part index, (n, d) chunk of that part's flat entries).
BlockChunks = Iterable[tuple[int, torch.Tensor]]


class TensorRule(BaseModel):
    """Parameters of the tensors whose name `match` (a regex) matches in full, laid over the
    method's own: the tensors' share of per-tensor method parameters (`MethodParams.tensor_params`)."""

    model_config = ConfigDict(extra="forbid")
    match: str = Field(description="regex, matched against the whole tensor name (as task_specific)")
    params: dict[str, Any] = Field(description="the method's parameters for these tensors, over its own")

    @field_validator("match")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"invalid regex {v!r}: {e}") from None
        return v

    @field_validator("params")
    @classmethod
    def _per_tensor(cls, v: dict[str, Any]) -> dict[str, Any]:
        fixed = sorted(set(v) & set(WHOLE_MODEL_PARAMS))
        if fixed:
            raise ValueError(f"{', '.join(fixed)} cannot differ by tensor (one per artifact)")
        return v


WHOLE_MODEL_PARAMS = ("tensor_params", "dtype")


class MethodParams(BaseModel):
    """Options every method takes: DARE as an optional preprocessing of the task vectors, and
    parameters that differ by tensor."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # lam=NaN would write an all-NaN model
    # Options a method gained after artifacts were written with it: `describe` (so the manifest)
    # records them only when they differ from their default, so those artifacts stay byte for byte.
    recorded_when_set: ClassVar[tuple[str, ...]] = ()
    dare: float = Field(0.0, ge=0.0, lt=1.0, description="DARE drop rate p applied first (0 = off)")
    seed: int = Field(0, description="seed of DARE's drops")
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="dtype of what is stored (default: the inputs'); arithmetic is always fp32")
    task_dare: dict[str, Annotated[float, Field(ge=0.0, lt=1.0)]] | None = Field(
        None, description="per-task DARE drop rate {task name: p} over `dare` (mergekit's per-model density, 1 − p)")
    task_keep: dict[str, Annotated[float, Field(gt=0.0, le=1.0)]] | None = Field(
        None, description="per-task keep of the magnitude trim {task name: keep} over `keep` (mergekit's per-model "
        "density), for methods that trim")
    tensor_params: list[TensorRule] = Field(
        default_factory=list, description="per-tensor parameters: [{match: REGEX, params: {...}}], the first rule "
        "whose regex matches a tensor's whole name gives it its parameters over the method's own")


class WeightedParams(MethodParams):
    """Options of a method that weights its members, as mergekit's per-model `weight`."""

    weights: dict[str, float] | None = Field(
        None, description="per-task weight {task name: w} (tasks not named weigh 1); a group's members keep "
        "theirs, normalized over the group where the method normalizes")


class MergeMethod:
    """Base class: subclasses set `name`, `Params`, and implement `merge`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    reference: ClassVar[str] = ""
    Params: ClassVar[type[MethodParams]] = MethodParams
    uses_masks: ClassVar[bool] = False  # stores θ0 + unified vector + 1-bit mask per member
    uses_scales: ClassVar[bool] = False  # and one fp32 rescaler per member
    elementwise: ClassVar[bool] = False  # merging a slice of entries needs only that slice
    uses_residuals: ClassVar[bool] = False  # stores θ0 + shared and per member a residual per tensor
    pairwise: ClassVar[bool] = False  # merges exactly two models (mergekit's slerp, nuslerp, nearswap, ...)
    _tasks: tuple[str, ...] | None = None  # the merge's task names (`for_tasks`)
    _members: tuple[int, ...] | None = None  # the group being merged, task indices (`for_group`)

    def residual_rank(self, shape: tuple[int, ...]) -> int | None:
        """Residual methods: the rank stored for a 2-D tensor of `shape`; None: stored exactly
        (or, with `data_dependent_size`, chosen from the data at merge time)."""
        return None

    @property
    def data_dependent_size(self) -> bool:
        """Whether what a group stores depends on the values (then planned sizes are upper bounds)."""
        return False

    @property
    def uses_untransformed(self) -> bool:
        """Whether materializing must also hand the method the members' task vectors before its
        transforms (TIES trim, DARE): then each chunk is (2n, d), the transformed rows first."""
        return False

    @property
    def needs_base(self) -> bool:
        """Whether the method reads θ0 too (it merges the models' weights, not only their task
        vectors): then each chunk it is given is (n + 1, d), the members' task vectors, then θ0."""
        return False

    @property
    def merges_weights(self) -> bool:
        """Whether the method merges the models themselves, θ0 being only what the result is stored
        against (mergekit's weight-space methods): then one of the tasks may be the base itself."""
        return False

    def __init__(self, **params: object):
        if "weights" in params and not self.weighted():
            raise ConfigError(f"method {self.name!r} takes no per-task weights (it merges its members alike); "
                              f"methods that do: {', '.join(n for n, c in _REGISTRY.items() if c.weighted())}")
        try:
            self.p = self.Params(**params)
        except ValidationError as e:
            raise ConfigError(f"invalid parameters for method {self.name!r}: {_short(e, self.Params)}") from None
        self._rules = [(re.compile(r.match), self._for_rule(i, r)) for i, r in enumerate(self.p.tensor_params)]
        self._rule_of: dict[str, int | None] = {}  # tensor -> the index of its rule (None: no rule matches)

    def _for_rule(self, i: int, rule: TensorRule) -> MergeMethod:
        """The method with `rule`'s parameters over this one's (checked now, not at merge time)."""
        own = self.p.model_dump(exclude={"tensor_params"}, exclude_unset=True)
        try:
            method = type(self)(**{**own, **rule.params})
        except ConfigError as e:
            raise ConfigError(f"tensor_params[{i}] ({rule.match!r}): {e}") from None
        flags = ("uses_masks", "uses_scales", "uses_residuals", "elementwise", "uses_untransformed",
                 "data_dependent_size", "needs_base", "merges_weights", "pairwise")
        if any(getattr(method, f) != getattr(self, f) for f in flags) or self.uses_scales or self.uses_residuals:
            raise ConfigError(f"tensor_params[{i}] ({rule.match!r}): method {self.name!r} cannot take these "
                              "parameters per tensor (they change what it stores)")
        return method

    def rule_of(self, key: str) -> int | None:
        """The index of the first `tensor_params` rule that matches tensor `key` (None: none does)."""
        if key not in self._rule_of:
            self._rule_of[key] = next((i for i, (rx, _) in enumerate(self._rules) if rx.fullmatch(key)), None)
        return self._rule_of[key]

    def for_key(self, key: str) -> MergeMethod:
        """The method that merges tensor `key`: this one with the parameters of the first
        `tensor_params` rule that matches `key`, bound as this one is (itself when none matches)."""
        rule = self.rule_of(key) if self._rules else None
        return self if rule is None else self._rules[rule][1].bind_like(self)

    @classmethod
    def weighted(cls) -> bool:
        """Whether the method takes per-task `weights`."""
        return "weights" in cls.Params.model_fields

    def params(self) -> dict[str, object]:
        """The parameters as recorded (`describe`, manifests): all, less unset `recorded_when_set`
        ones, unset `weights` and empty `tensor_params` (so artifacts of merges without them are
        written as before)."""
        fields = type(self.p).model_fields
        unset = (*self.p.recorded_when_set, "weights", "task_dare", "task_keep", "tensor_params")
        return {k: v for k, v in self.p.model_dump().items()
                if k not in unset or v != fields[k].get_default(call_default_factory=True)}

    def for_tasks(self, names: Sequence[str]) -> MergeMethod:
        """This method for a merge of the tasks `names` (in task order): what depends on the tasks
        is checked (a pairwise method needs two; `weights` must name tasks) and they are bound."""
        if self.pairwise and len(names) != 2:
            raise ConfigError(f"method {self.name!r} merges two models, got {len(names)} tasks: for more, use "
                              "multislerp or karcher")
        for per_task in ("weights", "task_dare", "task_keep"):
            unknown = sorted(set(getattr(self.p, per_task, None) or {}) - set(names))
            if unknown:
                raise ConfigError(f"{per_task} name {', '.join(map(repr, unknown))}, not among the tasks "
                                  f"({', '.join(names)})")
        for _, rule in self._rules:
            rule.for_tasks(names)  # a rule's weights must name tasks too
        bound = copy.copy(self)
        bound._tasks, bound._members = tuple(names), None
        return bound

    def for_group(self, members: Sequence[int]) -> MergeMethod:
        """This method as it merges the group `members` (task indices, in task order): a weighted
        method with those members' weights. A pairwise method merges groups of two only."""
        if self.pairwise and len(members) != 2:
            raise ConfigError(f"method {self.name!r} merges two models, not a group of {len(members)}: for more, "
                              "use multislerp or karcher")
        bound = copy.copy(self)
        bound._members = tuple(members)
        return bound

    def bind_like(self, other: MergeMethod) -> MergeMethod:
        """This method bound to the tasks and group `other` is bound to (a variant of `other`, such
        as one with other parameters for one tensor, merges what `other` merges)."""
        bound = copy.copy(self)
        bound._tasks, bound._members = other._tasks, other._members
        return bound

    def member_weights(self, n: int, device: torch.device | None = None) -> torch.Tensor | None:
        """The (n,) fp64 weights of the group being merged (tasks the weights do not name weigh 1),
        on `device`; None when the method has no weights (every member alike)."""
        weights = getattr(self.p, "weights", None)
        if weights is None:
            return None
        if self._tasks is None or self._members is None:
            raise RuntimeError(f"method {self.name!r} has weights: bind it to the tasks (for_tasks) and the "
                               "group (for_group) it merges")
        if len(self._members) != n:
            raise ValueError(f"method {self.name!r} is bound to a group of {len(self._members)}, given {n}")
        return torch.tensor([float(weights.get(self._tasks[t], 1.0)) for t in self._members], dtype=torch.float64,
                            device=device)

    def storage_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        return getattr(torch, self.p.dtype) if self.p.dtype else input_dtype

    def transforms(self) -> list[Transform]:
        """Global preprocessing, in order. DARE (when on) always comes first."""
        return [DareDrop(self.p.dare, self.p.seed)] if self.p.dare > 0 else []

    def pipeline(self) -> Pipeline:
        """The preprocessing, unfitted: `transforms()`, or with per-tensor parameters that change
        it, each tensor's own (`PerTensor`)."""
        if self._rules and any(m.transforms() for _, m in self._rules):
            return Pipeline([PerTensor(self.transforms_for)])
        return Pipeline(self.task_transforms())

    def transforms_for(self, key: str) -> list[Transform]:
        """The transforms of tensor `key` (`for_key`'s method's)."""
        return self.for_key(key).task_transforms()

    def task_transforms(self) -> list[Transform]:
        """`transforms()` with the per-task rates (`task_dare`, `task_keep`) of the tasks it is bound
        to (`for_tasks`) in place of the common ones; unbound, the same transforms (their kinds and
        order, which is what a plan asks before the tasks are known)."""
        out = self.transforms()
        if self._tasks is None or (self.p.task_dare is None and self.p.task_keep is None):
            return out
        for per_task, kind, off in (("task_dare", DareDrop, 0.0), ("task_keep", TopKTrim, 1.0)):
            rates = getattr(self.p, per_task)
            if rates and any(v != off for v in rates.values()) and not any(isinstance(t, kind) for t in out):
                common = "dare > 0" if kind is DareDrop else "keep < 1"
                raise ConfigError(f"method {self.name!r}: {per_task} needs its common rate on ({common}; the tasks not "
                                  f"named take it)")
        return [_per_task_rates(t, self.p, self._tasks) for t in out]

    def merge(self, deltas: torch.Tensor) -> GroupResult:
        """Merge the (n, D) task vectors of a group with n >= 2 members (flat view of a block)."""
        raise NotImplementedError

    def merge_parts(self, deltas: list[torch.Tensor], parts: Sequence[PartView]) -> GroupResult:
        """Merge a block given per tensor: deltas[i] is (n, *parts[i].shape). Methods that need
        shapes (SVD-based ones) override this; the default merges the flat concatenation."""
        return self.merge(torch.cat([d.flatten(1) for d in deltas], 1))

    def merge_chunks(self, chunks: BlockChunks, parts: Sequence[PartView]) -> GroupResult:
        """The one entry point for materializing: a block as consecutive (part, (n, d) chunk) pairs.

        Elementwise methods merge chunk by chunk, so memory holds one chunk of the members at a
        time, and the chunks may be one reused buffer; others see the whole block, per tensor.
        With per-tensor parameters, each run of the block's tensors that one method merges is
        merged by it (`for_key`)."""
        if self._rules:
            return _merge_per_tensor(self, chunks, parts)
        return _merge_one_method(self, chunks, parts)

    def merge_flat(self, deltas: torch.Tensor, parts: Sequence[PartView]) -> GroupResult:
        """Merge a block held as one (n, D) tensor (planning's merged-vector mode)."""
        pieces = torch.split(deltas, [p.numel for p in parts], dim=1)
        return self.merge_chunks(list(enumerate(pieces)), parts)

    def linear_weights(self, n: int, device: torch.device | None = None) -> torch.Tensor | None:
        """w with merged = Σ w_i τ_i when the method is linear (lets planning use Gram matrices);
        on `device` (None: the host). With per-tensor parameters, the planner measures with the
        method's own."""
        return None

    def describe(self) -> dict[str, object]:
        return {"name": self.name, **self.params()}


def _per_task_rates(tr: Transform, p: MethodParams, tasks: Sequence[str]) -> Transform:
    """DARE's and the trim's transform with each task's own rate (`task_dare`, `task_keep`)."""
    if isinstance(tr, DareDrop) and p.task_dare is not None:
        return DareDrop(tuple(float(p.task_dare.get(t, tr.p)) for t in tasks), tr.seed)
    if isinstance(tr, TopKTrim) and p.task_keep is not None:
        return TopKTrim(tuple(float(p.task_keep.get(t, tr.keep)) for t in tasks), tr.rule, tr.scope)
    return tr


def _merge_per_tensor(method: MergeMethod, chunks: BlockChunks, parts: Sequence[PartView]) -> GroupResult:
    """A block whose tensors resolve to different methods (`for_key`): each run of consecutive
    tensors with one method is merged by it, the results joined in order."""
    rules = [method.rule_of(p.key) for p in parts]
    runs: list[tuple[int, int]] = []  # [start, stop) of the parts of each run
    for i in range(len(parts)):
        if runs and rules[i] == rules[runs[-1][0]]:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    methods = [method.for_key(parts[a].key) for a, _ in runs]
    if len(runs) == 1:
        return _merge_one_method(methods[0], chunks, parts)
    run_of = {p: r for r, (a, b) in enumerate(runs) for p in range(a, b)}
    results = []
    for r, group in itertools.groupby(chunks, key=lambda pc: run_of[pc[0]]):
        a, b = runs[r]
        results.append(_merge_one_method(methods[r], ((p - a, c) for p, c in group), parts[a:b]))
    if len(results) != len(runs):
        raise ValueError(f"the chunks hold {len(results)} runs of tensors, the parts {len(runs)}")
    return GroupResult.concat(results)


def _merge_one_method(method: MergeMethod, chunks: BlockChunks, parts: Sequence[PartView]) -> GroupResult:
    """The block's tensors merged by `method` itself (no per-tensor dispatch)."""
    if method.elementwise:
        return _merge_into(method, chunks, sum(p.numel for p in parts))
    pieces: list[list[torch.Tensor]] = [[] for _ in parts]
    for p, c in chunks:
        pieces[p].append(c)  # fresh tensors: only elementwise methods get a reused buffer
    n = next(x for ps in pieces for x in ps).shape[0]
    return method.merge_parts([torch.cat(ps, 1).view(n, *part.shape) for ps, part in zip(pieces, parts)], parts)


def _merge_into(method: MergeMethod, chunks: BlockChunks, total: int) -> GroupResult:
    """Merge chunk by chunk into one preallocated result of the block's `total` entries: no list
    of per-chunk results to concatenate (a second block-sized copy), and no result aliases a
    chunk (the caller may reuse its buffer)."""
    out: GroupResult | None = None
    at = 0
    for _, c in chunks:
        r = method.merge(c)
        if out is None:
            masks = None if r.masks is None else torch.empty((r.masks.shape[0], total), dtype=r.masks.dtype,
                                                             device=r.masks.device)
            out = GroupResult(torch.empty(total, dtype=r.delta.dtype, device=r.delta.device), masks, r.scales)
        width = r.delta.numel()
        if at + width > total:
            raise ValueError(f"the chunks hold more than the parts' {total} entries")
        out.delta[at:at + width] = r.delta
        if masks is not None:
            out.masks[:, at:at + width] = r.masks
        at += width
    if out is None or at != total:
        raise ValueError(f"the chunks hold {at} entries, the parts {total}")
    return out


_REGISTRY: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    if cls.name in _REGISTRY:
        raise RuntimeError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def get_method(spec: str | MethodSpec | MergeMethod, params: Mapping[str, object] | None = None,
               **kw: object) -> MergeMethod:
    """A configured method from a name or spec (`ties`, `twin:rank=4:base=ties`) with `params` and
    keyword parameters added under the spec's own (`MethodSpec.with_params`: a key the spec sets
    keeps the spec's value); an instance, already configured, passes through."""
    if isinstance(spec, MergeMethod):
        if params or kw:
            raise ConfigError(f"method {spec.name!r} is an instance, already configured: pass its parameters "
                              "to its constructor or give its name")
        return spec
    twice = sorted(set(params or {}) & set(kw))
    if twice:
        raise ConfigError(f"method parameter(s) {', '.join(map(repr, twice))} given both in params and as keywords")
    return MethodSpec.of(spec).with_params({**(params or {}), **kw}).build()


def available_methods() -> dict[str, type[MergeMethod]]:
    return dict(sorted(_REGISTRY.items()))


@dataclass(frozen=True)
class MethodSpec:
    """A merging method and its parameters as one value, written `ties:keep=0.3` or
    `twin:rank=4:base=ties`: one word holds a method at one setting, so a sweep can name the same
    method at several, a curve be labelled by it, and a CLI flag carry it. `parse` reads the text
    (values as JSON: numbers, true/false, null, lists; else kept as text), `str` writes it back,
    `build` looks the method up in the registry and configures it."""

    name: str
    params: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"a method spec needs a method name, got {self.name!r}")
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))  # a value: read-only

    @classmethod
    def parse(cls, text: str) -> MethodSpec:
        """'twin:rank=4:base=ties' -> MethodSpec('twin', {'rank': 4, 'base': 'ties'})."""
        if not isinstance(text, str):
            raise ConfigError(f"a method is a name or a spec such as 'ties:keep=0.3', got {text!r}")
        name, *pairs = [x.strip() for x in text.split(":")]
        params = parse_params(pairs, f"method spec {text!r}",
                              malformed="{what}: {item!r} is not key=value (write e.g. twin:rank=4:base=ties)")
        if not name:
            raise ConfigError(f"method spec {text!r} names no method")
        return cls(name, params)

    @classmethod
    def of(cls, spec: str | MethodSpec) -> MethodSpec:
        """`spec` as a MethodSpec (text is parsed)."""
        return spec if isinstance(spec, MethodSpec) else cls.parse(spec)

    def __str__(self) -> str:
        """The canonical text: `parse(str(spec)) == spec`; a key or value text cannot spell (one
        with ':', a value JSON cannot write) is a ConfigError."""
        return ":".join([self.name, *(f"{_key_text(k)}={_value_text(k, v)}" for k, v in self.params.items())])

    def __repr__(self) -> str:
        return f"MethodSpec({self.name!r}, {dict(self.params)!r})"

    def __hash__(self) -> int:
        return hash((self.name, frozenset(self.params)))  # equal specs have equal names and keys

    def with_params(self, params: Mapping[str, object]) -> MethodSpec:
        """This spec with `params` added where it sets nothing. A key the spec sets keeps the spec's
        value, the more specific statement: the sweep curve `twin:rank=4` stays rank 4 under a
        config's params for `twin`, and `--method ties:keep=0.3 --param keep=0.5` merges with 0.3."""
        return MethodSpec(self.name, {**self.params, **{k: v for k, v in params.items() if k not in self.params}})

    def build(self) -> MergeMethod:
        """The registered method configured with these parameters; an unknown name or a bad
        parameter is a ConfigError naming it and the choices."""
        try:
            cls = _REGISTRY[self.name]
        except KeyError:
            raise UnknownNameError("merging method", self.name, _REGISTRY) from None
        return cls(**self.params)


def parse_value(text: str) -> object:
    """A parameter's value as a spec or `--param` writes it: JSON (numbers, true/false, null,
    lists, quoted text), else the text itself, stripped."""
    try:
        return json.loads(text)
    except ValueError:
        return text.strip()


def parse_params(items: Iterable[str], what: str = "--param",
                 malformed: str = "{what} {item!r} must be KEY=VALUE") -> dict[str, object]:
    """KEY=VALUE items (the CLI's `--param` shorthand, a spec's `key=value` parts) as parameters,
    values read as `parse_value`; `what` names them in errors, `malformed` words a bad item."""
    params: dict[str, object] = {}
    for item in items:
        kv = _key_value(item)
        if kv is None:
            raise ConfigError(malformed.format(what=what, item=item))
        if kv[0] in params:
            raise ConfigError(f"{what} sets {kv[0]!r} twice")
        params[kv[0]] = kv[1]
    return params


def _key_value(item: str) -> tuple[str, object] | None:
    """(key, value) of 'key=value'; None when it is not one."""
    key, eq, value = item.partition("=")
    if not eq or not key.strip():
        return None
    return key.strip(), parse_value(value)


def _key_text(key: str) -> str:
    if not isinstance(key, str) or not key or key != key.strip() or ":" in key or "=" in key:
        raise ConfigError(f"{key!r} cannot be written as a parameter name in a method spec")
    return key


def _value_text(key: str, value: object) -> str:
    """`value` as a spec writes it: text that JSON would read otherwise (or that `parse_value`
    would strip) quoted, anything else as JSON."""
    if isinstance(value, str) and value == value.strip() and _not_json(value):
        text = value
    else:
        try:
            text = json.dumps(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} cannot be written in a method spec (values are JSON)") from None
    if ":" in text:
        raise ConfigError(f"{key}={value!r} cannot be written in a method spec (':' separates its parameters)")
    return text


def _not_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return True
    return False


def _short(e: ValidationError, params: type[MethodParams]) -> str:
    """The errors one per key, with the value given; an unknown key with the method's parameters."""
    out = []
    for err in e.errors():
        where = ".".join(map(str, err["loc"])) or "params"
        if err["type"] == "extra_forbidden":
            out.append(f"{where}: {err['msg']} (its parameters: {', '.join(params.model_fields)})")
        elif err["loc"]:
            out.append(f"{where}: {err['msg'].removeprefix('Value error, ')}, got {_shown(err['input'])}")
        else:
            out.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(out)


def _shown(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class StructuredMethod(MergeMethod):
    """A method that merges per tensor and needs each tensor's shape (SVD-based methods): it
    implements `merge_parts`; a flat (n, D) vector without shapes is one 1-D tensor to it."""

    def merge(self, deltas: torch.Tensor) -> GroupResult:
        return self.merge_parts([deltas], [PartView("flat", (deltas.shape[1],))])

    def merge_parts(self, deltas: list[torch.Tensor], parts: Sequence[PartView]) -> GroupResult:
        raise NotImplementedError


class WeightSpaceMethod(StructuredMethod):
    """A method defined on the models' weights θ0 + τ_i, not on their task vectors (slerp, Karcher,
    Arcee Fusion): it reads θ0, may take the base itself as one of its tasks, and implements
    `merge_models`, per tensor; what is stored is the merged weights less θ0."""

    @property
    def needs_base(self) -> bool:
        return True

    @property
    def merges_weights(self) -> bool:
        return True

    def merge_models(self, models: torch.Tensor) -> torch.Tensor:
        """The merged weights of one tensor from the members' (n, *shape) weights."""
        raise NotImplementedError

    def merge_parts(self, deltas: list[torch.Tensor], parts: Sequence[PartView]) -> GroupResult:
        out = []
        for d in deltas:  # rows: the members' τ, then θ0
            base = d[-1]
            out.append((self.merge_models(d[:-1] + base) - base).flatten())
        return GroupResult(torch.cat(out))
