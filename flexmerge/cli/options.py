"""Options several commands share, and the step from flags to the one validated `MergeConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from flexmerge.config import MergeConfig, build_config
from flexmerge.errors import FlexMergeError
from flexmerge.methods import parse_params
from flexmerge.taskvec import parse_task_specs

BaseOpt = typer.Option(None, "--base", help="base checkpoint: .safetensors, sharded index.json, .pt/.bin or HF dir")
ModelOpt = typer.Option(None, "--model", help="a fine-tuned model as NAME=PATH (repeat for each task)")
MethodOpt = typer.Option(None, "--method", help="merging method (see `flexmerge methods`), optionally with its "
                                                "parameters: ties:keep=0.3 (as sweep --methods) [default: task_arithmetic]")
ParamOpt = typer.Option(None, "--param", help="method hyperparameter KEY=VALUE, e.g. lam=1.0 (repeatable)")
WeightOpt = typer.Option(None, "--weight", help="a task's weight NAME=W for methods that weight their tasks "
                                                "(linear, ties, ...; mergekit's per-model weight; repeatable; "
                                                "tasks not named weigh 1)")
GranOpt = typer.Option(None, "--granularity", help="layer | sublayer | tensor | split:K [default: sublayer]")
PlannerOpt = typer.Option(None, "--planner", help="greedy | recon | left-right | right-left | random | channel | "
                                                  "cluster (output: data-aware, suites only; docs/planners.md)")
LinkageOpt = typer.Option(None, "--linkage", help="constituent linkage: min (default) | avg | max")
ModeOpt = typer.Option(None, "--mode", help="similarity: constituent (default) | merged")
MeasureOpt = typer.Option(None, "--measure", help="merged-vector measure: cosine | euclidean | sign")
SeedOpt = typer.Option(None, "--seed", help="seed of the random order, k-means and DARE")
ConfigOpt = typer.Option(None, "--config", help="YAML file with the same fields, or a mergekit config "
                                                "(docs/mergekit.md); flags override it")
ExecOpt = typer.Option(None, "--executor",
                       help="where block work runs: local (default, one block at a time) | threads (two at once) | ray")
RayOpt = typer.Option(None, "--ray-address", help="Ray cluster address (default with --executor ray: a local instance)")
DeviceOpt = typer.Option(None, "--device", help="where preprocessing, the similarity pass and merging compute: "
                                                "cpu (default) | auto (CUDA when available) | cuda | cuda:N")
RelOpt = typer.Option(None, "--max-relative-change",
                      help="largest ||θ_t − θ0|| / ||θ0|| accepted before the base is rejected [default: 0.5]")
SpecificOpt = typer.Option(None, "--task-specific",
                           help="regex (full match) of parameters each task keeps for itself, never merged (repeatable); "
                                "Hugging Face heads (classifier, score, qa_outputs) are detected without one; lm_head merges "
                                "unless you pass 'lm_head\\..*'")
HashOpt = typer.Option(None, "--input-hash",
                       help="fingerprint of every input's content (provenance, resume): xxh3_128 (default, "
                            "~25 GB/s) | sha256 (cryptographic, ~1.7 GB/s per core)")
MixedOpt = typer.Option(None, "--allow-mixed-dtypes/--no-allow-mixed-dtypes", help="merge inputs of different float dtypes")
CacheOpt = typer.Option(None, "--cache-dir", help="where fine-tuned zoos are cached [default: ~/.cache/flexmerge]")
RebuildOpt = typer.Option(False, "--rebuild", help="retrain the zoo even if a verified cached one exists")


def merge_config(config: Path | None, **flags: Any) -> MergeConfig:
    """The validated merge description: the --config file (YAML or mergekit), then the flags given
    over it (see `config_fields`)."""
    return build_config(config, config_fields(**flags))


def config_fields(*, model: list[str] | None = None, param: list[str] | None = None, weight: list[str] | None = None,
                  task_specific: list[str] | None = None, mixed: bool | None = None, **flags: Any) -> dict[str, Any]:
    """The flags as MergeConfig fields (`flags`: field names already; None means not given)."""
    params = parse_params(param or [])
    if weight:
        if "weights" in params:
            raise FlexMergeError("weights given twice: by --weight and by --param weights=...; give one")
        params["weights"] = task_weights(weight)
    return {**flags, "models": parse_task_specs(model) if model else None, "params": params,
            "task_specific": task_specific or None, "allow_mixed_dtypes": mixed}


def task_weights(items: list[str]) -> dict[str, float]:
    """`--weight NAME=W` items as {task name: weight}."""
    out: dict[str, float] = {}
    for item in items:
        name, eq, value = item.partition("=")
        name = name.strip()
        try:
            w = float(value) if eq and name else None
        except ValueError:
            w = None
        if w is None or w != w or abs(w) == float("inf"):
            raise FlexMergeError(f"--weight {item!r} must be NAME=W with W a finite number, e.g. --weight sst2=0.7")
        if name in out:
            raise FlexMergeError(f"--weight sets task {name!r} twice")
        out[name] = w
    return out


def floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FlexMergeError(f"{what} must be comma-separated numbers, got {text!r}") from None


def names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]
