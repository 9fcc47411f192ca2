"""One validated description of a merge, shared by the CLI flags, YAML files and Python."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flexmerge.errors import ConfigError


class MergeConfig(BaseModel):
    """Fields of `flexmerge plan` / `flexmerge merge`; `--config merge.yaml` holds the same names."""

    model_config = ConfigDict(extra="forbid")

    base: Path = Field(description="base (pretrained) checkpoint")
    models: dict[str, Path] = Field(description="task name -> fine-tuned checkpoint")
    method: str = "task_arithmetic"
    params: dict[str, Any] = Field(default_factory=dict, description="method hyperparameters")
    granularity: str = "sublayer"
    blocks: dict[str, str] | None = Field(None, description="explicit block patterns {name: regex}")
    planner: str = "greedy"
    linkage: Literal["min", "avg", "max"] = "min"
    mode: Literal["constituent", "merged"] = "constituent"
    measure: Literal["cosine", "euclidean", "sign"] = "cosine"
    seed: int = 0
    size: float | None = Field(None, gt=0, description="target size in model units (merge only)")
    allow_mixed_dtypes: bool = False
    max_relative_change: float = Field(0.5, gt=0)
    executor: Literal["local", "threads", "ray"] = "local"
    ray_address: str | None = Field(None, description="an existing Ray cluster (default: start a local one)")

    @field_validator("models")
    @classmethod
    def _two_or_more(cls, v: dict[str, Path]) -> dict[str, Path]:
        if len(v) < 2:
            raise ValueError(f"merging needs at least 2 task models, got {len(v)}")
        return v

    def plan_options(self) -> dict[str, Any]:
        return {"granularity": self.granularity, "patterns": self.blocks, "planner": self.planner,
                "linkage": self.linkage, "mode": self.mode, "measure": self.measure, "seed": self.seed}


def build_config(file: Path | None, overrides: dict[str, Any]) -> MergeConfig:
    """Fields from a YAML file (paths relative to it), then the overrides that are not None."""
    data: dict[str, Any] = {}
    if file is not None:
        if not file.is_file():
            raise ConfigError(f"config file not found: {file}")
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{file}: invalid YAML ({e})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: expected a mapping of fields at the top level")
        root = file.parent
        if "base" in data:
            data["base"] = root / str(data["base"])
        if isinstance(data.get("models"), dict):
            data["models"] = {k: root / str(v) for k, v in data["models"].items()}
    for k, v in overrides.items():
        if v is None or (k == "params" and not v):
            continue
        data[k] = {**data.get("params", {}), **v} if k == "params" else v
    try:
        return MergeConfig(**data)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'config'}: {x['msg']}" for x in e.errors())
        raise ConfigError(f"invalid merge configuration: {msgs}") from None
