"""Export an artifact as one shared base model plus one PEFT LoRA adapter per task, the layout that
multi-adapter servers load (peft's `adapter_names` mixed batches, vLLM's `--enable-lora`).

DIR/base is a transformers model directory (weights, config, tokenizer, README.md); DIR/adapters/<task>
a PEFT LoRA adapter in peft's own file layout and key names (`flexmerge.io.adapters` reads the same
names back); DIR/README.md lists the tasks with their ranks and errors.

The base, block by block (`shared_base`): the tensors of the block's largest group of several tasks
that read one stored tensor (its merged weights; for a Twin-Merging group θ0 + the shared vector, so
that each member's delta is its stored low-rank residual), else the mean of the tasks' weights, the
base that makes the adapters' total squared delta smallest.

A task's adapter is its weights minus the base's, module by module:
* Linear and Embedding weights: LoRA factors of the delta's truncated SVD, lossless by default (every
  singular value above float noise), or at most `rank`, or the fewest holding `energy` of Σσ². A
  Twin-Merging residual is factored from its stored factors, so it keeps its stored rank exactly.
  The adapter config's `r` and `lora_alpha` are the largest rank and per-module ranks are in
  `rank_pattern` = `alpha_pattern`: the scaling is 1 in peft and in vLLM (which reads only r, alpha).
* Linear biases: peft's `lora_bias` (B.bias), exact.
* Norms (`norms="fold"`): a norm y = g ⊙ n(x) + β whose output only Linear layers read is folded into
  them, W' = W_t·diag(g_t/g_b), c' = c_t + W_t·β_t − W'·β_b, so the norm stays the base's and the
  adapter is plain LoRA (peft can mix such adapters in one batch; vLLM loads them). Which Linear
  layers read a norm is found by running the base once with hooks, and checked by a second run in
  which the norm's output is scaled and its readers' inputs unscaled: the logits must not move.
* Everything else that differs (a norm that cannot be folded, a sequence-classification head,
  embeddings in an adapter that needs `lora_bias`, which peft refuses on embeddings): the module
  saved whole (`modules_to_save`), exact.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from flexmerge._atomic import atomic_directory, check_target
from flexmerge.errors import ConfigError, FlexMergeError
from flexmerge.extras import require_extra
from flexmerge.flexmodel.card import card_names, safe_name
from flexmerge.flexmodel.export import (
    CARD,
    INDEX,
    SHARD,
    WEIGHTS,
    is_export_file,
    shard_limit,
    side_files,
    write_weights,
)
from flexmerge.flexmodel.format import side_file_name
from flexmerge.flexmodel.model import BlockStore, FlexModel, StoredGroup
from flexmerge.flexmodel.write import unshare, write_safetensors
from flexmerge.io.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    EMBEDDING_A,
    EMBEDDING_B,
    LORA_A,
    LORA_B,
    LORA_B_BIAS,
    PREFIX,
)
from flexmerge.io.source import HF_SIDE_FILES, HF_SIDE_GROUPS
from flexmerge.methods.twin import energy_rank
from flexmerge.runtime.hf_model import load_config, model_class

BASE, ADAPTERS = "base", "adapters"
ADAPTER_FILE = ADAPTER_WEIGHTS[0]  # adapter_model.safetensors
PEFT_MARK = "flexmerge_peft"  # safetensors metadata key of every weight file of a peft export
NORM_MODES = ("fold", "save")
# peft's task types by the transformers class name's ending; the heads peft itself saves whole for them
TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
              ("ForTokenClassification", "TOKEN_CLS"))
PEFT_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score")}
# config fields tasks may differ in and still share one base (the base's are the first task's)
PER_TASK_CONFIG = ("_name_or_path", "id2label", "label2id", "transformers_version", "dtype", "torch_dtype")
TOKENIZER_GROUPS = ("tokenizer", "chat template")
VLLM_MAX_RANK = 512  # the largest --max-lora-rank vLLM accepts
PROBE_TOKENS = 12


@dataclass(frozen=True)
class RankRule:
    """How many singular directions of a weight's delta an adapter keeps: every one above float
    noise (lossless, the default), at most `rank`, or the fewest holding `energy` of Σσ²."""

    rank: int | None = None
    energy: float | None = None

    def __post_init__(self) -> None:
        if self.rank is not None and self.energy is not None:
            raise ConfigError("give a rank or an energy, not both")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")
        if self.energy is not None and (isinstance(self.energy, bool) or not isinstance(self.energy, (int, float))
                                        or not 0 < self.energy <= 1):
            raise ConfigError(f"energy must be a fraction in (0, 1], got {self.energy!r}")

    def keep(self, s: torch.Tensor, shape: tuple[int, ...]) -> int:
        """The rank kept from singular values `s` (descending) of a delta of `shape`."""
        if not s.numel() or float(s[0]) == 0.0:
            return 0
        noise = float(s[0]) * max(shape) * torch.finfo(torch.float32).eps  # torch.linalg.matrix_rank's tolerance
        lossless = int((s > noise).sum())
        if self.rank is not None:
            return min(self.rank, lossless)
        if self.energy is not None:
            return min(energy_rank(s, self.energy), lossless)
        return lossless

    def describe(self) -> str:
        if self.rank is not None:
            return f"rank <= {self.rank}"
        if self.energy is not None:
            return f"energy >= {self.energy:g}"
        return "lossless (every singular value above float noise)"


@dataclass
class AdapterReport:
    """What one task's adapter holds and how far it is from the task's weights."""

    task: str
    ranks: dict[str, int]  # LoRA module -> rank
    saved: list[str]  # modules saved whole (modules_to_save)
    folded: list[str]  # norms folded into the Linear layers reading them
    biases: list[str]  # Linear modules with a LoRA bias
    relative_error: float  # ‖Δ − BA‖_F / ‖Δ‖_F over the LoRA modules' weights
    nbytes: int  # adapter_model.safetensors' tensors

    @property
    def rank(self) -> int:
        return max(self.ranks.values(), default=0)

    @property
    def vllm_ready(self) -> bool:
        """vLLM refuses modules_to_save and (since 0.11) LoRA biases, and ranks above 512."""
        return not self.saved and not self.biases and self.rank <= VLLM_MAX_RANK

    def summary(self) -> str:
        ranks = sorted(set(self.ranks.values()))
        span = "-" if not ranks else str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        parts = [f"{len(self.ranks)} LoRA modules (rank {span})", f"relative error {self.relative_error:.3g}"]
        if self.folded:
            parts.append(f"{len(self.folded)} norms folded")
        if self.biases:
            parts.append(f"{len(self.biases)} LoRA biases")
        if self.saved:
            parts.append(f"{len(self.saved)} modules saved whole ({', '.join(self.saved[:3])}"
                         f"{', ...' if len(self.saved) > 3 else ''})")
        return ", ".join(parts)


@dataclass
class PeftExport:
    """The written export: where, per task its adapter's report, whether peft can run every
    adapter in one batch (`adapter_names`), and notes on what could not be done as LoRA."""

    path: Path
    reports: dict[str, AdapterReport]
    mixed_batches: bool
    notes: list[str] = field(default_factory=list)


# the shared base ---------------------------------------------------------------------------

def shared_group(store: BlockStore) -> StoredGroup | None:
    """The group whose stored tensors are the base's for this block: the largest unmasked group of
    several tasks (the first of equals), or None when every task has weights of its own."""
    shared = [g for g in store.groups if not g.masked and len(g.members) > 1]
    return max(shared, key=lambda g: len(g.members)) if shared else None


def shared_base(flex: FlexModel) -> dict[str, torch.Tensor]:
    """The base state dict of the export (see the module docstring), in the artifact's key order."""
    uniform = torch.full((len(flex.tasks),), 1.0 / len(flex.tasks))

    def read(store: BlockStore, p: int) -> torch.Tensor:
        group = shared_group(store)
        return group.tensors[p] if group is not None else flex.mixed_part(store, p, uniform)

    return flex.assemble(read, _mean_own_parameters(flex))


def _mean_own_parameters(flex: FlexModel) -> dict[str, torch.Tensor]:
    """The mean of the tasks' own parameters (heads kept per task), which must be alike in shape."""
    own = [flex.specific.get(t, {}) for t in flex.tasks]
    if any(set(o) != set(own[0]) for o in own):
        raise ConfigError("the tasks keep different parameters of their own: one base model cannot hold them")
    out: dict[str, torch.Tensor] = {}
    for key in own[0]:
        if key in flex.meta:
            raise ConfigError(f"the tasks added rows of their own to {key!r} (tokens of their own): one base model "
                              "cannot hold every task's vocabulary; export the tasks one by one with --task")
        values = [o[key] for o in own]
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            raise ConfigError(f"the tasks' own {key!r} differ in shape ({', '.join(map(str, shapes))}; heads of "
                              "different label counts?): one base model cannot hold them; export the tasks one by "
                              "one with --task")
        first = values[0]
        out[key] = torch.stack([v.float() for v in values]).mean(0).to(first.dtype) if first.is_floating_point() \
            else first
    return out


def _base_side_files(flex: FlexModel) -> dict[str, bytes]:
    """The first task's Hugging Face files, once every task's config is checked to describe the same model."""
    missing = [t for t in flex.tasks if "config.json" not in flex.hf_files.get(t, {})]
    if missing:
        raise ConfigError(f"this artifact holds no Hugging Face config for task {missing[0]!r} (it was merged from "
                          "plain checkpoint files): a peft export needs models saved by save_pretrained")
    first = flex.tasks[0]
    reference = _model_config(flex.hf_files[first]["config.json"], first)
    for task in flex.tasks[1:]:
        config = _model_config(flex.hf_files[task]["config.json"], task)
        differ = sorted(k for k in set(config) | set(reference) if config.get(k) != reference.get(k))
        if differ:
            raise ConfigError(f"tasks {first!r} and {task!r} have different model configs ({', '.join(differ[:4])}): "
                              "one base model cannot serve both")
    return dict(flex.hf_files[first])


def _model_config(data: bytes, task: str) -> dict[str, Any]:
    try:
        config = json.loads(data)
    except (ValueError, RecursionError):
        raise ConfigError(f"task {task!r}: its config.json is not valid JSON") from None
    if not isinstance(config, dict):
        raise ConfigError(f"task {task!r}: its config.json is not a JSON object")
    return {k: v for k, v in config.items() if k not in PER_TASK_CONFIG}


def _own_tokenizer(flex: FlexModel, task: str, base: dict[str, bytes]) -> dict[str, bytes]:
    """The task's tokenizer and chat template files when they are not the base's (else none)."""
    names = [n for g in TOKENIZER_GROUPS for n in HF_SIDE_GROUPS[g]]
    own = {n: d for n, d in flex.hf_files.get(task, {}).items() if n in names}
    return own if own != {n: d for n, d in base.items() if n in names} else {}


# the base model's modules ------------------------------------------------------------------

@dataclass
class ModelPlan:
    """The base model's modules as the adapters see them, read from the model loaded from DIR/base."""

    model: Any
    task_type: str | None
    params: dict[str, str]  # model parameter name (tied names too) -> the artifact key holding its values
    kinds: dict[str, str]  # module name -> "linear" | "embedding" | "head" | "other"
    folds: dict[str, tuple[str, ...]]  # norm module -> the Linear modules that alone read its output
    notes: list[str] = field(default_factory=list)


def _task_type(model: Any) -> str | None:
    name = type(model).__name__
    return next((peft_type for ending, peft_type in TASK_TYPES if name.endswith(ending)), None)


def _load_base(directory: Path, task: str) -> Any:
    """The export's base as transformers loads it, which must use every weight written."""
    config = load_config(directory, task)
    cls = model_class(config, task)
    try:
        with _no_progress_bar():
            model, info = cls.from_pretrained(directory, config=config, dtype="auto", output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise FlexMergeError(f"the base model does not load as {cls.__name__} ({first})") from None
    for what, keys in (("has no weight for", info.get("missing_keys")),
                       ("does not use", info.get("unexpected_keys")), ("cannot take", info.get("mismatched_keys"))):
        if keys:
            raise FlexMergeError(f"the base written does not fit {cls.__name__}: it {what} {sorted(keys)[0]!r}")
    return model.eval()


def parameter_keys(model: Any, keys: Iterable[str]) -> dict[str, str]:
    """Model parameter name -> the artifact key holding its values; tied parameters (an lm_head
    tied to the embeddings) under each of their names, from the one key the checkpoint has."""
    keys = set(keys)
    by_param: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(p), []).append(name)
    params: dict[str, str] = {}
    for names in by_param.values():
        key = next((n for n in names if n in keys), None)
        if key is not None:
            params.update({n: key for n in names})
    return params


@contextmanager
def _no_progress_bar() -> Iterator[None]:
    """transformers' loading bar is noise here: the base is loaded to be inspected, not for the user."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def model_plan(model: Any, params: dict[str, str], changed: set[str], norms: str) -> ModelPlan:
    """The kinds of `model`'s modules and, with `norms="fold"`, the norms among the modules of
    `changed` (parameters some task's adapter has to carry) that can be folded, and into what."""
    task_type = _task_type(model)
    heads = PEFT_HEADS.get(task_type, ())
    kinds = {}
    for module_name in {n.rpartition(".")[0] for n in params}:
        module = model.get_submodule(module_name)
        kinds[module_name] = ("head" if module_name.rpartition(".")[2] in heads
                              else "linear" if isinstance(module, torch.nn.Linear)
                              else "embedding" if isinstance(module, torch.nn.Embedding) else "other")
    plan = ModelPlan(model, task_type, params, kinds, {})
    others = sorted({n.rpartition(".")[0] for n in changed} & {m for m, k in kinds.items() if k == "other"})
    candidates = [m for m in others if _is_norm_like(model.get_submodule(m))]
    if norms == "fold" and candidates:
        plan.folds, note = find_folds(model, candidates)
        if note:
            plan.notes.append(note)
    return plan


def _is_norm_like(module: torch.nn.Module) -> bool:
    """A leaf module whose own parameters are a 1-D `weight` (and `bias`) of one length."""
    own = dict(module.named_parameters(recurse=False))
    return (not list(module.children()) and set(own) in ({"weight"}, {"weight", "bias"})
            and all(p.dim() == 1 and p.shape == own["weight"].shape for p in own.values()))


def _probe_ids(model: Any) -> torch.Tensor:
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, max(vocab, 1), (2, PROBE_TOKENS), generator=g)


def _first_output(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.to_tuple()[0] if hasattr(out, "to_tuple") else out[0]


def find_folds(model: Any, norms: list[str]) -> tuple[dict[str, tuple[str, ...]], str | None]:
    """The norms among `norms` that only Linear layers read, with those layers: found by running the
    model once on token ids with hooks (a Linear reads a norm when its input is the norm's output
    tensor), then checked by scaling each norm's output and unscaling its readers' inputs, which
    must leave the output unchanged. The other norms are left out, with a note saying why."""
    try:
        with torch.no_grad():
            readers = _readers(model, norms)
            reference = _first_output(model(input_ids=_probe_ids(model))).float()
    except Exception as e:  # noqa: BLE001  (any model that does not run on token ids alone)
        return {}, f"norms are saved whole: the model does not run on token ids alone ({type(e).__name__})"
    candidates = {n: tuple(readers.get(n, ())) for n in norms if readers.get(n)}
    if candidates and not _scaling_holds(model, candidates, reference):
        candidates = {n: r for n, r in candidates.items() if _scaling_holds(model, {n: r}, reference)}
    left = [n for n in norms if n not in candidates]
    note = (f"{len(left)} norms are saved whole: their output reaches more than Linear layers "
            f"(e.g. {left[0]}; a post-norm residual stream)") if left else None
    return candidates, note


def _readers(model: Any, norms: list[str]) -> dict[str, list[str]]:
    """Per norm, the Linear modules whose input is its output tensor (one forward pass with hooks;
    the outputs are held, so that no later tensor can reuse their memory and look alike)."""
    outputs: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, a, out, n=n: outputs.__setitem__(n, out)) for n in norms]
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    handles += [m.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0]) if a else None)
                for n, m in linears]
    try:
        model(input_ids=_probe_ids(model))
    finally:
        for h in handles:
            h.remove()

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.data_ptr() == b.data_ptr()
                and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype)

    return {n: [lin for lin, x in inputs.items() if same(x, out)] for n, out in outputs.items()}


def _scaling_holds(model: Any, folds: dict[str, tuple[str, ...]], reference: torch.Tensor) -> bool:
    """Whether scaling each norm's output by random s > 0 and dividing its readers' inputs by s
    leaves the model's output as it was: then the norm's output reaches the output only through them."""
    g = torch.Generator().manual_seed(1)
    handles = []
    for norm, readers in folds.items():
        module = model.get_submodule(norm)
        s = (0.5 + torch.rand(module.weight.shape, generator=g)).to(module.weight.dtype)
        handles.append(module.register_forward_hook(lambda m, a, out, s=s: out * s))
        handles += [model.get_submodule(r).register_forward_pre_hook(lambda m, a, s=s: (a[0] / s, *a[1:]))
                    for r in readers]
    try:
        with torch.no_grad():
            scaled = _first_output(model(input_ids=_probe_ids(model))).float()
    finally:
        for h in handles:
            h.remove()
    half = next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
    return bool((scaled - reference).abs().max() <= (3e-2 if half else 1e-4) * reference.abs().max().clamp_min(1e-6))


# one task's adapter ------------------------------------------------------------------------

@dataclass
class Adapter:
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    report: AdapterReport


def _changed(task: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, v in task.items() if not torch.equal(v, base[n])}


def fold_norms(plan: ModelPlan, base: dict[str, torch.Tensor], task: dict[str, torch.Tensor],
               changed: set[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`task`'s parameters with every changed norm of `plan.folds` moved into the Linear layers
    reading it (the norm then reads as the base's), where the norm computes g ⊙ n(x) + β (checked
    on its own module) and the readers have the biases the move needs."""
    out, folded = dict(task), []
    for norm, readers in plan.folds.items():
        names = [f"{norm}.weight", f"{norm}.bias"]
        if not any(n in changed for n in names):
            continue
        moved = _fold(plan.model.get_submodule(norm), norm, readers, base, out)
        if moved is not None:
            out.update(moved)
            out.update({n: base[n] for n in names if n in base})
            folded.append(norm)
    return out, folded


def _fold(module: torch.nn.Module, norm: str, readers: tuple[str, ...], base: dict[str, torch.Tensor],
          task: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The readers' weights (and biases) that take the task's norm g_t, β_t into the base's g_b, β_b:
    W' = W_t·diag(g_t/g_b), c' = c_t + W_t·β_t − W'·β_b; None when that is not exact."""
    g_b, g_t = base[f"{norm}.weight"].float(), task[f"{norm}.weight"].float()
    beta_b = base[f"{norm}.bias"].float() if f"{norm}.bias" in base else None
    beta_t = task[f"{norm}.bias"].float() if f"{norm}.bias" in task else None
    if bool(((g_b == 0) & (g_t != 0)).any()) or not _affine_in_weight(module, norm, task):
        return None
    ratio = torch.where(g_b == 0, torch.ones_like(g_b), g_t / torch.where(g_b == 0, torch.ones_like(g_b), g_b))
    out: dict[str, torch.Tensor] = {}
    for reader in readers:
        w_key, b_key = f"{reader}.weight", f"{reader}.bias"
        w_t = task[w_key].float()
        w_new = w_t * ratio
        out[w_key] = w_new.to(task[w_key].dtype)
        shift = w_t @ beta_t - w_new @ beta_b if beta_t is not None else None
        if b_key in task:
            bias = task[b_key].float() + (shift if shift is not None else 0)
            out[b_key] = bias.to(task[b_key].dtype)
        elif shift is not None and bool(shift.abs().max() > 0):
            return None  # the shift needs a bias the reader does not have
    return out


def _affine_in_weight(module: torch.nn.Module, norm: str, task: dict[str, torch.Tensor]) -> bool:
    """Whether the module with the task's parameters gives g_t ⊙ (y_b − β_b)/g_b + β_t on a random
    input, y_b its output with the base's: it computes g ⊙ n(x) + β (Gemma's (1 + g) does not)."""
    weight = module.weight
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, weight.shape[0], generator=g).to(weight.dtype)
    own = {"weight": task[f"{norm}.weight"]}
    if getattr(module, "bias", None) is not None:
        own["bias"] = task[f"{norm}.bias"]
    with torch.no_grad():
        y_b = module(x).float()
        y_t = torch.func.functional_call(module, own, (x,)).float()
    g_b, g_t = weight.float(), own["weight"].float()
    beta_b = module.bias.float() if "bias" in own else torch.zeros_like(g_b)
    beta_t = own["bias"].float() if "bias" in own else torch.zeros_like(g_b)
    safe = torch.where(g_b == 0, torch.ones_like(g_b), g_b)
    predicted = torch.where(g_b == 0, beta_t, g_t * (y_b - beta_b) / safe + beta_t)
    tolerance = 1e-2 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-4
    return bool((predicted - y_t).abs().max() <= tolerance * y_t.abs().max().clamp_min(1e-6))


def twin_factors(flex: FlexModel, task: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per artifact key stored whole in a Twin-Merging group that is its block's base, the task's
    residual factors (a, b): its delta to the base is a @ b, of the stored rank."""
    t = flex.tasks.index(task)
    out = {}
    for block, store in zip(flex.partition.blocks, flex.blocks):
        group = store.group_for(t)
        if group.residuals is None or group is not shared_group(store):
            continue
        for p, part in enumerate(block.parts):
            factors = group.residuals[group.members.index(t)][p]
            if part.rows is None and len(factors) == 2:
                out[part.key] = (factors[0].float(), factors[1].float())
    return out


def _svd(delta: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor] | None):
    """U, S, Vᴴ of `delta`, from its factors a @ b when given (QR of both, SVD of the r × r core)."""
    if factors is None:
        return torch.linalg.svd(delta, full_matrices=False)
    a, b = factors
    qa, ra = torch.linalg.qr(a)
    qb, rb = torch.linalg.qr(b.T)
    u, s, vh = torch.linalg.svd(ra @ rb.T)
    return qa @ u, s, vh @ qb.T


def low_rank(delta: torch.Tensor, rule: RankRule,
             factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(left (m, k), right (k, n)) with left @ right the rank-k truncated SVD of `delta` (fp32),
    k from `rule`; the singular values split evenly between the two."""
    u, s, vh = _svd(delta, factors)
    k = rule.keep(s, tuple(delta.shape))
    root = s[:k].sqrt()
    return (u[:, :k] * root).contiguous(), (root[:, None] * vh[:k]).contiguous()


def task_adapter(task: str, plan: ModelPlan, base: dict[str, torch.Tensor], weights: dict[str, torch.Tensor],
                 rule: RankRule, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Adapter:
    """One task's adapter: `weights` and `base` are by model parameter name; `factors` by artifact key."""
    changed = _changed(weights, base)
    weights, folded = fold_norms(plan, base, weights, changed) if plan.folds else (weights, [])
    changed = _changed(weights, base)
    modules: dict[str, set[str]] = {}
    for name in changed:
        module, _, attr = name.rpartition(".")
        modules.setdefault(module, set()).add(attr)
    for head in (m for m, kind in plan.kinds.items() if kind == "head"):  # peft loads these whole, changed or not
        modules.setdefault(head, set())
    kinds = {m: plan.kinds.get(m, "other") for m in modules}
    biased = sorted(m for m, attrs in modules.items() if kinds[m] == "linear" and "bias" in attrs)
    lora = sorted(m for m in modules if kinds[m] == "linear" or (kinds[m] == "embedding" and not biased))
    saved = sorted(m for m in modules if m not in lora)
    for m in saved:
        _check_savable(plan.model, m)

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    error2 = total2 = 0.0
    for m in lora:
        w = f"{m}.weight"
        dtype = base[w].dtype
        delta = weights[w].float() - base[w].float()
        stored = factors.get(plan.params[w]) if w not in _folded_readers(plan, folded) else None
        left, right = low_rank(delta, rule, stored)
        if left.shape[1] == 0:  # a bias alone: rank-1 zero factors carry it
            left, right = delta.new_zeros(delta.shape[0], 1), delta.new_zeros(1, delta.shape[1])
        left, right = left.to(dtype), right.to(dtype)
        error2 += float((delta - left.float() @ right.float()).square().sum())
        total2 += float(delta.square().sum())
        ranks[m] = left.shape[1]
        if kinds[m] == "embedding":  # peft: Δ = (B @ A)ᵀ with A (r, num_embeddings), B (dim, r)
            tensors[f"{PREFIX}{m}{EMBEDDING_A}"], tensors[f"{PREFIX}{m}{EMBEDDING_B}"] = left.T, right.T
        else:
            tensors[f"{PREFIX}{m}{LORA_A}"], tensors[f"{PREFIX}{m}{LORA_B}"] = right, left
        if m in biased:
            b = f"{m}.bias"
            tensors[f"{PREFIX}{m}{LORA_B_BIAS}"] = (weights[b].float() - base[b].float()).to(base[b].dtype)
    for m in saved:
        for attr, _ in plan.model.get_submodule(m).named_parameters(recurse=False):
            tensors[f"{PREFIX}{m}.{attr}"] = weights[f"{m}.{attr}"]
    if not ranks:  # no LoRA weight differs: a zero LoRA on one Linear layer keeps the adapter loadable
        linears = [n for n, k in plan.kinds.items() if k == "linear"]
        if not linears:
            raise FlexMergeError(f"{type(plan.model).__name__} has no Linear layer for a LoRA adapter to target")
        m = min(linears)
        shape = base[f"{m}.weight"].shape
        dtype = base[f"{m}.weight"].dtype
        tensors[f"{PREFIX}{m}{LORA_A}"] = torch.zeros(1, shape[1], dtype=dtype)
        tensors[f"{PREFIX}{m}{LORA_B}"] = torch.zeros(shape[0], 1, dtype=dtype)
        ranks[m] = 1
    tensors = {k: v.contiguous() for k, v in unshare(tensors).items()}
    error = (error2 / total2) ** 0.5 if total2 > 0 else 0.0
    report = AdapterReport(task, ranks, saved, folded, biased, error, sum(t.nbytes for t in tensors.values()))
    return Adapter(tensors, adapter_config(ranks, saved, bool(biased), plan.task_type), report)


def _folded_readers(plan: ModelPlan, folded: list[str]) -> set[str]:
    return {f"{r}.weight" for n in folded for r in plan.folds[n]}


def _check_savable(model: Any, module: str) -> None:
    """modules_to_save copies a module with everything below it: only leaf modules can be saved."""
    if not module or list(model.get_submodule(module).children()):
        raise FlexMergeError(f"the tasks differ in parameters of {module or 'the model itself'!r}, which LoRA cannot "
                             "express and which is not a leaf module that peft could save whole")


def adapter_config(ranks: dict[str, int], saved: list[str], lora_bias: bool, task_type: str | None) -> dict[str, Any]:
    """adapter_config.json, with peft's LoraConfig field names. r = lora_alpha = the largest rank and
    rank_pattern = alpha_pattern per module, so the scaling is 1 in peft (alpha/r per module) and in
    vLLM (which reads r and lora_alpha only). Pattern keys are escaped: peft matches them as regexes."""
    r = max(ranks.values())
    pattern = {re.escape(m): k for m, k in sorted(ranks.items()) if k != r}
    return {"peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": None, "revision": None,
            "inference_mode": True, "r": r, "lora_alpha": r, "lora_dropout": 0.0, "use_rslora": False,
            "use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": lora_bias,
            "init_lora_weights": True, "target_modules": sorted(ranks), "rank_pattern": pattern,
            "alpha_pattern": dict(pattern), "modules_to_save": saved or None, "layers_to_transform": None,
            "layers_pattern": None}


# writing -----------------------------------------------------------------------------------

def export_peft(flex: FlexModel, out: str | Path, *, rank: int | None = None, energy: float | None = None,
                norms: str = "fold", overwrite: bool = False,
                max_shard_size: int | str | None = None) -> PeftExport:
    """Write `out`/base and `out`/adapters/<task> for every task of `flex` (see the module docstring).

    `rank` / `energy`: truncate each adapted weight's delta (default: lossless). `norms`: "fold"
    (into the Linear layers reading them, where exact) or "save" (modules_to_save). `overwrite`
    replaces an earlier peft export only; nothing is visible at `out` until everything is written."""
    out = Path(out)
    rule = RankRule(rank, energy)
    if norms not in NORM_MODES:
        raise ConfigError(f"norms must be one of {', '.join(NORM_MODES)}, got {norms!r}")
    require_extra("suites", "a peft export")
    limit = shard_limit(max_shard_size)
    check_target(out, overwrite, is_peft_export, "a flexmerge peft export")  # before any work
    files = _base_side_files(flex)
    base_state = {k: v.contiguous() for k, v in unshare(shared_base(flex)).items()}
    reports: dict[str, AdapterReport] = {}
    with atomic_directory(out, overwrite=overwrite, replaceable=is_peft_export, what="a flexmerge peft export") as tmp:
        base_dir = tmp / BASE
        base_dir.mkdir()
        write_weights(base_state, base_dir, {"format": "pt", PEFT_MARK: BASE}, limit)
        for name, data in side_files(files, None).items():
            (base_dir / side_file_name(name)).write_bytes(data)
        (base_dir / CARD).write_text(base_card(flex), encoding="utf-8")
        model = _load_base(base_dir, flex.tasks[0])
        with torch.no_grad():
            plan = _plan_for(flex, model, base_state, norms)
            base = {n: base_state[k] for n, k in plan.params.items()}
            for task in flex.tasks:
                state = flex.state_dict(task)
                adapter = task_adapter(task, plan, base, {n: state[k] for n, k in plan.params.items()}, rule,
                                       twin_factors(flex, task))
                _write_adapter(tmp / ADAPTERS / task, adapter, _own_tokenizer(flex, task, files), flex, rule)
                reports[task] = adapter.report
        mixable = all(isinstance(model.get_submodule(m), (torch.nn.Linear, torch.nn.Embedding))
                      for r in reports.values() for m in r.saved)
        result = PeftExport(out, reports, mixable, list(plan.notes))
        (tmp / CARD).write_text(index_card(flex, result, rule), encoding="utf-8")
    return result


def _plan_for(flex: FlexModel, model: Any, base_state: dict[str, torch.Tensor], norms: str) -> ModelPlan:
    """The model plan, given the parameters that some task changes (they decide the norms to fold);
    a changed key that is no parameter of the model (a buffer) cannot go into an adapter."""
    params = parameter_keys(model, base_state)
    mapped = set(params.values())
    changed: set[str] = set()
    for task in flex.tasks:
        state = flex.state_dict(task)
        moved = {k for k in base_state if not torch.equal(state[k], base_state[k])}
        stray = sorted(moved - mapped)
        if stray:
            raise FlexMergeError(f"task {task!r} differs from the base in {stray[0]!r}, which is no parameter of "
                                 f"{type(model).__name__}: an adapter cannot carry it")
        changed |= {n for n, k in params.items() if k in moved}
    return model_plan(model, params, changed, norms)


def _write_adapter(directory: Path, adapter: Adapter, tokenizer: dict[str, bytes], flex: FlexModel,
                   rule: RankRule) -> None:
    directory.mkdir(parents=True)
    write_safetensors(adapter.tensors, directory / ADAPTER_FILE,
                      metadata={"format": "pt", PEFT_MARK: adapter.report.task})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(adapter.config, indent=2) + "\n", encoding="utf-8")
    for name, data in tokenizer.items():
        (directory / side_file_name(name)).write_bytes(data)
    (directory / CARD).write_text(adapter_card(flex, adapter.report, rule), encoding="utf-8")


def is_peft_export(path: Path) -> bool:
    """A directory a peft export wrote and that holds nothing else (what --overwrite may replace)."""
    if not path.is_dir() or path.is_symlink():
        return False
    entries = {p.name: p for p in path.iterdir()}
    if not {BASE, ADAPTERS} <= set(entries) <= {BASE, ADAPTERS, CARD}:
        return False
    if CARD in entries and (not entries[CARD].is_file() or entries[CARD].is_symlink()):
        return False
    base, adapters = entries[BASE], entries[ADAPTERS]
    if not _only_files(base, {WEIGHTS, INDEX, CARD, *HF_SIDE_FILES}, SHARD):
        return False
    weights = [f for f in base.iterdir() if f.name == WEIGHTS or SHARD.fullmatch(f.name)]
    if not weights or not all(is_export_file(f, PEFT_MARK) for f in weights):
        return False
    if not adapters.is_dir() or adapters.is_symlink():
        return False
    known = {ADAPTER_FILE, ADAPTER_CONFIG, CARD, *HF_SIDE_FILES}
    return all(_only_files(d, known) and is_export_file(d / ADAPTER_FILE, PEFT_MARK) for d in adapters.iterdir())


def _only_files(directory: Path, names: set[str], pattern: re.Pattern | None = None) -> bool:
    return directory.is_dir() and not directory.is_symlink() and all(
        f.is_file() and not f.is_symlink() and (f.name in names or (pattern is not None and pattern.fullmatch(f.name)))
        for f in directory.iterdir())


# cards -------------------------------------------------------------------------------------

def _front(front: dict[str, Any]) -> list[str]:
    return ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", ""]


def _artifact_line(flex: FlexModel) -> str:
    base, _ = card_names(flex.info, flex.tasks)
    method = safe_name(flex.method.get("name"))
    return (f"a FlexMerge artifact of {len(flex.tasks)} fine-tunes of `{base}` merged with `{method}` "
            f"at size {flex.size:.3f}x")


def base_card(flex: FlexModel) -> str:
    """README.md of DIR/base: what these weights are and how they were chosen."""
    return "\n".join(_front({"tags": ["merge", "flexmerge"], "library_name": "transformers"}) + [
        "# The shared base of a FlexMerge peft export", "",
        f"The base model that every adapter in `../adapters/` applies to, from {_artifact_line(flex)}.", "",
        "Block by block, these are the weights of the block's largest group of tasks that read one stored "
        "tensor: its merged weights (for a Twin-Merging group, θ0 + the shared vector, so each task's adapter "
        "is its low-rank residual). Where every task has weights of its own, they are the mean of the tasks' "
        "weights. It is not the original base model.", ""])


def adapter_card(flex: FlexModel, report: AdapterReport, rule: RankRule) -> str:
    """README.md of one adapter: its contents, its relative error and how to load it."""
    rows = [("task", f"`{report.task}`"), ("rank rule", rule.describe()),
            ("LoRA modules", f"{len(report.ranks)} (ranks {sorted(set(report.ranks.values()))})"),
            ("relative error", f"{report.relative_error:.4g} (‖Δ − BA‖_F / ‖Δ‖_F over the LoRA modules' "
                               "weights, Δ = this task's weights − the base's)"),
            ("norms folded into the Linear layers reading them", str(len(report.folded))),
            ("LoRA biases (lora_bias)", str(len(report.biases))),
            ("modules saved whole (modules_to_save)", ", ".join(f"`{m}`" for m in report.saved) or "none"),
            ("vLLM's requirements (no modules_to_save, no LoRA bias, r <= 512)",
             "met" if report.vllm_ready else "not met")]
    return "\n".join(_front({"library_name": "peft", "tags": ["merge", "flexmerge", "lora"]}) + [
        f"# {report.task}: a LoRA adapter from a FlexMerge artifact", "",
        f"Task `{report.task}` of {_artifact_line(flex)}, as a LoRA adapter of this export's shared base "
        "(`../../base`, not the original base model).", "",
        "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
        "## Load", "", "```python", "from peft import PeftModel",
        "from transformers import AutoModel  # the base's class, e.g. AutoModelForCausalLM", "",
        'base = AutoModel.from_pretrained("EXPORT/base")',
        f'model = PeftModel.from_pretrained(base, "EXPORT/adapters/{report.task}", adapter_name="{report.task}")',
        "```", ""])


def index_card(flex: FlexModel, export: PeftExport, rule: RankRule) -> str:
    """DIR/README.md: the tasks, their adapters' ranks and errors, and how to serve them."""
    lines = _front({"tags": ["merge", "flexmerge", "lora"]}) + [
        "# A FlexMerge peft export", "", f"{len(flex.tasks)} LoRA adapters over one shared base, from "
        f"{_artifact_line(flex)}. Rank rule: {rule.describe()}.", "",
        "| task | LoRA modules | rank (r) | relative error | saved whole | vLLM-ready |", "|---|---|---|---|---|---|"]
    for task, r in export.reports.items():
        lines.append(f"| `{task}` | {len(r.ranks)} | {r.rank} | {r.relative_error:.4g} | {len(r.saved)} | "
                     f"{'yes' if r.vllm_ready else 'no'} |")
    modules = " ".join(f"{t}=EXPORT/adapters/{t}" for t in export.reports)
    rank = max(r.rank for r in export.reports.values())
    mixing = ("one batch may mix tasks (`adapter_names=[...]`)." if export.mixed_batches else
              "peft cannot mix these adapters in one batch (a module saved whole is not a Linear or Embedding).")
    lines += ["", *[f"Note: {n}.\n" for n in export.notes], "## Serve", "",
              f"peft: load `base/`, then each adapter with `load_adapter`; {mixing}",
              "", "vLLM (adapters without modules_to_save or LoRA biases):", "", "```bash",
              f"vllm serve EXPORT/base --enable-lora --max-lora-rank {_vllm_rank(rank)} "
              f"--max-loras {len(export.reports)} --lora-modules {modules}", "```", ""]
    return "\n".join(lines)


def _vllm_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds `rank`."""
    return next((r for r in (1, 8, 16, 32, 64, 128, 256, 320, 512) if r >= rank), rank)
