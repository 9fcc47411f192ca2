"""One validated description of a merge, shared by the CLI flags, YAML files and Python."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flexmerge.device import resolve_device
from flexmerge.errors import ConfigError
from flexmerge.mergekit import MERGEKIT_KEYS, from_mergekit, is_mergekit
from flexmerge.paths import UnsafePathError, check_task_name
from flexmerge.planning.options import PlanOptions
from flexmerge.size import parse_bytes

PLAN_DEFAULTS = PlanOptions()


class MergeConfig(BaseModel):
    """Fields of `flexmerge plan` / `flexmerge merge`; `--config merge.yaml` holds the same names."""

    model_config = ConfigDict(extra="forbid")

    base: Path = Field(description="base (pretrained) checkpoint")
    models: dict[str, Path] = Field(description="task name -> fine-tuned checkpoint")
    method: str = "task_arithmetic"
    params: dict[str, Any] = Field(default_factory=dict, description="method hyperparameters")
    granularity: str = "sublayer"
    blocks: dict[str, str] | None = Field(None, description="explicit block patterns {name: regex}")
    planner: str = PLAN_DEFAULTS.planner
    linkage: Literal["min", "avg", "max"] = PLAN_DEFAULTS.linkage
    mode: Literal["constituent", "merged"] = PLAN_DEFAULTS.mode
    measure: Literal["cosine", "euclidean", "sign"] = PLAN_DEFAULTS.measure
    seed: int = PLAN_DEFAULTS.seed
    size: Annotated[float, Field(gt=0, allow_inf_nan=False)] | Literal["max", "min"] | None = Field(
        None, description="target size in model units (one whole fine-tune each), 1 <= size <= M; 'max': every "
        "fine-tune as it is, 'min': the smallest point (merge only)")
    max_bytes: int | None = Field(None, gt=0, description="storage budget in bytes: the largest point that fits "
                                  "(everything stored counts); instead of size (merge only)")
    task_specific: list[str] = Field(default_factory=list,
                                     description="regexes (full match) of parameters each task keeps for itself")
    allow_mixed_dtypes: bool = False
    max_relative_change: float = Field(0.5, gt=0, allow_inf_nan=False)
    input_hash: Literal["xxh3_128", "sha256"] = Field(
        "xxh3_128", description="fingerprint of every input's content, for provenance and resume")
    executor: Literal["local", "threads", "ray"] = "local"
    ray_address: str | None = Field(None, description="an existing Ray cluster (default: start a local one)")
    device: str = Field("cpu", description="where preprocessing, the similarity pass and merging compute: "
                        "cpu | auto (CUDA when available) | cuda | cuda:N")
    tokenizer_source: Literal["tasks", "base"] = Field(
        "tasks", description="the tokenizer every export carries: each task's own (or the base's when it has none), "
        "or the base's (every model then read over the base's vocabulary: rows a fine-tune added are dropped, "
        "as mergekit's tokenizer_source: base)")
    chat_template: str | None = Field(None, description="a Jinja chat template every export carries")

    @field_validator("models")
    @classmethod
    def _two_or_more(cls, v: dict[str, Path]) -> dict[str, Path]:
        if len(v) < 2:
            raise ValueError(f"merging needs at least 2 task models, got {len(v)}")
        for name in v:
            check_task_name(name)
        return v

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() in ("max", "min"):
            return v.strip().lower()
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                raise ValueError(f"size {v!r} is not a number of model units, 'max' or 'min'") from None
        return v

    @field_validator("max_bytes", mode="before")
    @classmethod
    def _bytes(cls, v: Any) -> Any:
        return parse_bytes(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _one_target(self) -> "MergeConfig":
        if self.size is not None and self.max_bytes is not None:
            raise ValueError("give either size or max_bytes, not both")
        return self

    @model_validator(mode="after")
    def _usable_device(self) -> "MergeConfig":
        """An unknown or absent device fails here, before the validation pass reads any model."""
        try:
            resolve_device(self.device, self.executor)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return self

    def plan_options(self) -> PlanOptions:
        return PlanOptions.of(planner=self.planner, linkage=self.linkage, mode=self.mode, measure=self.measure,
                              seed=self.seed)

    def load_options(self) -> dict[str, Any]:
        """`load_tasks`' options (the executor aside: it is made from `executor` and `ray_address`)."""
        return {"task_specific": self.task_specific, "allow_mixed_dtypes": self.allow_mixed_dtypes,
                "max_relative_change": self.max_relative_change, "input_hash": self.input_hash,
                "vocabulary": self.tokenizer_source}

    def partition_options(self) -> dict[str, Any]:
        """How the parameters are cut into blocks (`discover_blocks`' granularity and patterns)."""
        return {"granularity": self.granularity, "patterns": self.blocks}

    def side_file_options(self) -> dict[str, Any]:
        """What every export carries besides the weights (`merge_to_disk`'s tokenizer_source, chat_template)."""
        return {"tokenizer_source": self.tokenizer_source, "chat_template": self.chat_template}


def _one_line(e: yaml.YAMLError) -> str:
    """A YAML error as 'problem at line L, column C', without the multi-line source excerpt."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML that refuses a mapping with a key given twice (PyYAML keeps the last one silently)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: SafeLoader reports it itself
            break
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                    key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


# flexmerge's own fields a mergekit YAML may add (`size`, `max_bytes`, the planner's options, ...)
MERGEKIT_EXTRA_KEYS = tuple(k for k in MergeConfig.model_fields
                            if k not in ("base", "models", "method", "params") and k not in MERGEKIT_KEYS)


def _resolve_paths(data: dict[str, Any], file: Path) -> dict[str, Any]:
    """`base` and `models` paths relative to the config file's folder; task names checked."""
    root = file.parent
    if "base" in data:
        data["base"] = root / str(data["base"])
    if isinstance(data.get("models"), dict):
        try:
            data["models"] = {check_task_name(k, str(file)): root / str(v) for k, v in data["models"].items()}
        except UnsafePathError as e:
            raise ConfigError(str(e)) from None
    return data


def read_documents(file: Path) -> list[dict[str, Any]]:
    """The YAML documents of a config file (one, or mergekit-multi's stages), each a mapping."""
    if not file.exists():
        raise ConfigError(f"config file not found: {file}")
    if not file.is_file():
        raise ConfigError(f"config {file} is not a regular file")
    try:
        docs = [d if d is not None else {} for d in yaml.load_all(file.read_bytes().decode("utf-8"),
                                                                 Loader=_UniqueKeyLoader)]
    except OSError as e:
        raise ConfigError(f"{file}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{file}: not UTF-8 text ({e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{file}: invalid YAML ({_one_line(e)})") from None
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            which = f"document {i + 1}" if len(docs) > 1 else "the file"
            raise ConfigError(f"{file}: expected a mapping of fields at the top level of {which}")
    return docs or [{}]


def build_config(file: Path | None, overrides: dict[str, Any]) -> MergeConfig:
    """Fields from a YAML file (paths relative to it; flexmerge's or mergekit's, see `flexmerge.mergekit`),
    then the overrides that are not None. A file of several documents (mergekit-multi's stages)
    is `flexmerge.stages`'."""
    docs = read_documents(file) if file is not None else [{}]
    if len(docs) > 1:
        raise ConfigError(f"{file}: {len(docs)} YAML documents are mergekit-multi's stages, which `flexmerge merge` "
                          "runs in order; give one document here")
    return config_of(docs[0], file, overrides)


def config_of(data: dict[str, Any], file: Path | None, overrides: dict[str, Any],
              stages: dict[str, Path] | None = None) -> MergeConfig:
    """The validated configuration of one document `data` of `file` (flexmerge's or mergekit's; a
    mergekit document's models may name the outputs of earlier `stages`), overrides laid over it."""
    data = dict(data)
    if file is not None and data:
        if is_mergekit(data):
            data = from_mergekit(data, file.parent, str(file), MERGEKIT_EXTRA_KEYS, stages)
        else:
            data = _resolve_paths(data, file)
    for k, v in overrides.items():
        if v is None or (k == "params" and not v):
            continue
        data[k] = {**data.get("params", {}), **v} if k == "params" else v
    try:
        return MergeConfig(**data)
    except ValidationError as e:
        msgs = "; ".join(("{}: ".format(".".join(map(str, x["loc"]))) if x["loc"] else "")
                         + x["msg"].removeprefix("Value error, ") for x in e.errors())
        raise ConfigError(f"invalid merge configuration: {msgs}") from None
