"""PEFT adapters as checkpoints: a LoRA or (IA)³ adapter read against its base model stands for
the fine-tune it makes, one tensor at a time.

`AdapterSource(adapter_dir, base)` has the base's keys; reading a key the adapter updates gives
the weight peft's `merge_and_unload()` would give, computed with the same operations in the same
order (so equal bit for bit), when that key is read, never the whole model at once:

* LoRA: W + transpose(B @ A, fan_in_fan_out) · scaling, scaling = alpha / r (alpha / √r with
  `use_rslora`), r and alpha per module from `rank_pattern` / `alpha_pattern`; embeddings:
  W + (B @ A)ᵀ · scaling; `lora_bias`: b + B.bias · scaling. fp16/bf16 factors are multiplied in
  fp32 and cast back, as peft does on the CPU.
* (IA)³: W ⊙ l (l transposed with fan_in_fan_out); a layer scaled on its outputs (l of shape
  [out, 1]; not a feed-forward module) also scales its bias. A feed-forward module's l has shape
  [1, in]: the two are told apart by the shape peft gives l.
* Parameters the adapter stores whole (`modules_to_save` heads, biases trained with
  `bias="all"`) replace the base's.

Keys the adapter does not touch read as the base's, so their task vectors are zero: a block no
adapter touches is identical in every model, hence frozen (stored once, never planned).

The dispatcher (`flexmerge.io.open.open_checkpoint`) hands adapter directories here with their
base already opened; the adapter's own weights are a plain file (`flexmerge.io.source.open_file`),
so this module depends on the file sources and never on the dispatcher.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from flexmerge.errors import CheckpointError
from flexmerge.io.source import CheckpointSource, TensorMeta, open_file
from flexmerge.paths import inside

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."  # peft's name for the wrapped model, before every module name
CONFIG_MAX_BYTES = 1 << 20
SUPPORTED = ("LORA", "IA3")
# adapter-config options that change what the adapter computes and that this reader does not model
UNSUPPORTED_OPTIONS = ("use_dora", "use_qalora", "use_bdlora", "layer_replication", "target_parameters",
                       "trainable_token_indices", "alora_invocation_tokens", "arrow_config", "megatron_config")
# peft's names of a module's LoRA tensors (after PREFIX + the module's name)
LORA_A, LORA_B, LORA_B_BIAS = ".lora_A.weight", ".lora_B.weight", ".lora_B.bias"
EMBEDDING_A, EMBEDDING_B = ".lora_embedding_A", ".lora_embedding_B"
LORA_SUFFIXES = (LORA_A, LORA_B, LORA_B_BIAS, EMBEDDING_A, EMBEDDING_B)


def is_adapter_dir(path: Path) -> bool:
    """A directory holding a PEFT adapter (its adapter_config.json)."""
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class LoraUpdate:
    """W + transpose(B @ A) · scaling for one module (embeddings: always transposed)."""

    a: str
    b: str
    scaling: float
    transpose: bool


@dataclass(frozen=True)
class Ia3Update:
    """W ⊙ l for one module (l already oriented as W's rows or columns)."""

    l: str
    transpose: bool


class AdapterSource:
    """The fine-tune a PEFT adapter makes of `base` (see the module docstring), as a CheckpointSource."""

    def __init__(self, path: Path, base: CheckpointSource):
        self.path, self.base = path, base
        self.hf_dir = base.hf_dir  # the config, tokenizer and head detection come from the base
        self.config = read_adapter_config(path)
        self.peft_type = self.config["peft_type"]
        self._weights_path = _weights_file(path)
        self.weights = open_file(self._weights_path, hf_dir=None)
        self._base_keys = set(base.keys())
        self._updates: dict[str, LoraUpdate | Ia3Update] = {}
        self._biases: dict[str, tuple[str, float | None]] = {}  # bias key -> (lora_B.bias, scaling) or (ia3_l, None)
        self._replaced: dict[str, str] = {}  # base key -> adapter key stored whole
        self._last: tuple[str, torch.Tensor] | None = None
        self._index()

    # CheckpointSource --------------------------------------------------------------------------

    def keys(self) -> list[str]:
        return self.base.keys()

    def meta(self, key: str) -> TensorMeta:
        return self.weights.meta(self._replaced[key]) if key in self._replaced else self.base.meta(key)

    def read(self, key: str) -> torch.Tensor:
        last = self._last
        if last is not None and last[0] == key:  # row ranges of one key are read one after the other
            return last[1]
        out = self._read(key)
        self._last = (key, out)
        return out

    def files(self) -> list[Path]:
        return [self.path / ADAPTER_CONFIG, self._weights_path]

    # the fine-tuned weights --------------------------------------------------------------------

    def _read(self, key: str) -> torch.Tensor:
        if key in self._replaced:
            return self.weights.read(self._replaced[key])
        base = self.base.read(key)
        update = self._updates.get(key)
        if isinstance(update, LoraUpdate):
            merged = base.clone()
            merged += self._lora_delta(update)
            return merged
        if isinstance(update, Ia3Update):
            l = self.weights.read(update.l)
            return torch.mul(base, l.t() if update.transpose else l).to(base.dtype)
        if key in self._biases:
            source, scaling = self._biases[key]
            if scaling is not None:  # peft: bias += lora_B.bias * scaling
                merged = base.clone()
                merged += self.weights.read(source) * scaling
                return merged
            return torch.mul(base, self.weights.read(source).reshape(base.shape)).to(base.dtype)
        return base

    def _lora_delta(self, u: LoraUpdate) -> torch.Tensor:
        """peft's `get_delta_weight`: fp16/bf16 factors in fp32 on the CPU, cast back to B's dtype."""
        a, b = self.weights.read(u.a), self.weights.read(u.b)
        dtype = b.dtype
        if dtype in (torch.float16, torch.bfloat16):
            a, b = a.float(), b.float()
        delta = b @ a
        out = (delta.t() if u.transpose else delta) * u.scaling
        return out.to(dtype)

    # reading and checking the adapter ---------------------------------------------------------

    def _index(self) -> None:
        modules: dict[str, dict[str, str]] = {}
        for key in self.weights.keys():
            if not key.startswith(PREFIX):
                raise CheckpointError(f"{self._weights_path}: key {key!r} does not start with {PREFIX!r}; "
                                      "not a PEFT adapter file")
            name = key[len(PREFIX):]
            suffix = next((s for s in (*LORA_SUFFIXES, ".ia3_l") if name.endswith(s)), None)
            if suffix is None:
                if ".lora_" in name or name.endswith(".lora_magnitude_vector"):
                    raise CheckpointError(f"{self._weights_path}: {key!r} is a LoRA variant this reader does "
                                          "not support (plain LoRA and (IA)³ only)")
                self._replace(name, key)
            else:
                modules.setdefault(name[: -len(suffix)], {})[suffix] = key
        if not modules and not self._replaced:
            raise CheckpointError(f"{self._weights_path}: the adapter holds no weights")
        for module, parts in modules.items():
            if self.peft_type == "LORA":
                self._add_lora(module, parts)
            else:
                self._add_ia3(module, parts)

    def _replace(self, name: str, key: str) -> None:
        """A parameter the adapter stores whole (modules_to_save, trained biases)."""
        if name not in self._base_keys:
            raise CheckpointError(f"{self.path}: the adapter stores {name!r}, which the base model "
                                  f"{self.base.path} does not have: is this the adapter's base?")
        self._replaced[name] = key

    def _target(self, module: str) -> tuple[str, tuple[int, ...]]:
        weight = f"{module}.weight"
        if weight not in self._base_keys:
            raise CheckpointError(f"{self.path}: the adapter targets module {module!r}, but the base model "
                                  f"{self.base.path} has no {weight!r}: is this the adapter's base?")
        return weight, tuple(self.base.meta(weight).shape)

    def _add_lora(self, module: str, parts: dict[str, str]) -> None:
        embedding = EMBEDDING_A in parts or EMBEDDING_B in parts
        a = parts.get(EMBEDDING_A if embedding else LORA_A)
        b = parts.get(EMBEDDING_B if embedding else LORA_B)
        if a is None or b is None:
            raise CheckpointError(f"{self._weights_path}: module {module!r} has only one of its LoRA factors")
        weight, shape = self._target(module)
        a_shape, b_shape = tuple(self.weights.meta(a).shape), tuple(self.weights.meta(b).shape)
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise CheckpointError(f"{self._weights_path}: module {module!r}: LoRA factors of shapes {list(a_shape)} "
                                  f"and {list(b_shape)}; only Linear and Embedding layers are supported")
        rank = a_shape[0]
        transpose = embedding or bool(self.config.get("fan_in_fan_out", False))
        product = (a_shape[1], b_shape[0]) if transpose else (b_shape[0], a_shape[1])
        if b_shape[1] != rank or product != shape:
            raise CheckpointError(f"{self.path}: module {module!r}: LoRA factors {list(b_shape)} @ {list(a_shape)} "
                                  f"do not make the base's {weight} of shape {list(shape)}: is this the adapter's base?")
        bias = parts.get(LORA_B_BIAS)
        if bias is not None and f"{module}.bias" not in self._base_keys:
            raise CheckpointError(f"{self.path}: module {module!r} has a LoRA bias but the base has no "
                                  f"{module}.bias")
        scaling = lora_scaling(self.config, module, rank)
        self._updates[weight] = LoraUpdate(a, b, scaling, transpose)
        if bias is not None:
            self._biases[f"{module}.bias"] = (bias, scaling)

    def _add_ia3(self, module: str, parts: dict[str, str]) -> None:
        if set(parts) != {".ia3_l"}:
            raise CheckpointError(f"{self._weights_path}: module {module!r} mixes (IA)³ and LoRA weights")
        l_key = parts[".ia3_l"]
        weight, shape = self._target(module)
        l_shape = tuple(self.weights.meta(l_key).shape)
        transpose = bool(self.config.get("fan_in_fan_out", False))
        oriented = tuple(reversed(l_shape)) if transpose else l_shape
        if len(shape) != 2 or oriented not in ((shape[0], 1), (1, shape[1])):
            raise CheckpointError(f"{self.path}: module {module!r}: an (IA)³ vector of shape {list(l_shape)} does "
                                  f"not scale the base's {weight} of shape {list(shape)}: is this the adapter's base?")
        self._updates[weight] = Ia3Update(l_key, transpose)
        scales_outputs = l_shape[1] == 1  # peft: [out, 1] for a layer scaled on its outputs, [1, in] feed-forward
        if scales_outputs and f"{module}.bias" in self._base_keys:
            self._biases[f"{module}.bias"] = (l_key, None)


def lora_scaling(config: dict, module: str, rank: int) -> float:
    """alpha / r, or alpha / √r with use_rslora; r and alpha from rank_pattern / alpha_pattern when
    a pattern matches the module (peft's rule: the first key k with `(.*\\.)?(k)$` matching)."""
    r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r"))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha"))
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise CheckpointError(f"adapter config: rank r={r!r} for module {module!r} must be a positive integer")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise CheckpointError(f"adapter config: lora_alpha={alpha!r} for module {module!r} must be a finite number")
    if r != rank:
        raise CheckpointError(f"adapter config: module {module!r} has rank {rank} in the weights but r={r} in "
                              "the config")
    return alpha / math.sqrt(r) if config.get("use_rslora", False) else alpha / r


def _pattern_value(patterns: dict, module: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter_config(path: Path) -> dict:
    """adapter_config.json, checked: a supported adapter type and no option that changes the update
    in a way this reader does not model."""
    f = path / ADAPTER_CONFIG
    try:
        if f.stat().st_size > CONFIG_MAX_BYTES:
            raise CheckpointError(f"{f}: larger than {CONFIG_MAX_BYTES} bytes; not an adapter config")
        config = json.loads(f.read_bytes())
    except OSError as e:
        raise CheckpointError(f"{f}: cannot read ({e.strerror or e})") from e
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({str(e)[:200]})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{f}: must be a JSON object")
    kind = config.get("peft_type")
    if kind not in SUPPORTED:
        raise CheckpointError(f"{f}: peft_type {kind!r} is not supported (supported: {', '.join(SUPPORTED)})")
    used = [k for k in UNSUPPORTED_OPTIONS if config.get(k) not in (None, False, {}, [])]
    if used:
        raise CheckpointError(f"{f}: adapter option {used[0]}={config[used[0]]!r} is not supported")
    for k in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(k) or {}, dict):
            raise CheckpointError(f"{f}: {k} must be an object of module pattern -> value")
    return config


def _weights_file(path: Path) -> Path:
    """The adapter's weights file, which must lie inside its directory."""
    for name in ADAPTER_WEIGHTS:
        if (path / name).exists():
            return inside(path, name, "adapter weights")
    raise CheckpointError(f"{path}: a PEFT adapter directory must hold {' or '.join(ADAPTER_WEIGHTS)}")
