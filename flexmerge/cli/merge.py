"""Commands of the merge itself: plan, merge, inspect, export, methods."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from flexmerge._atomic import check_target
from flexmerge.api import artifact_summary, load_for_merge, path_unit
from flexmerge.api import plan as plan_path
from flexmerge.cli.app import command, console
from flexmerge.cli.options import (
    BaseOpt,
    ConfigOpt,
    DeviceOpt,
    ExecOpt,
    GranOpt,
    HashOpt,
    LinkageOpt,
    MeasureOpt,
    MethodOpt,
    MixedOpt,
    ModelOpt,
    ModeOpt,
    ParamOpt,
    PlannerOpt,
    RayOpt,
    RelOpt,
    SeedOpt,
    SpecificOpt,
    WeightOpt,
    config_fields,
    merge_config,
)
from flexmerge.errors import ConfigError, FlexMergeError, UnknownNameError
from flexmerge.executors import get_executor
from flexmerge.flexmodel import export as export_task
from flexmerge.flexmodel import load
from flexmerge.methods import available_methods
from flexmerge.peft_export import export_peft, is_peft_export
from flexmerge.planning.path import SIZE_TOLERANCE, MergePath, is_path_file
from flexmerge.size import format_bytes
from flexmerge.stages import is_multi_stage, merge_from_config, merge_stages
from flexmerge.taskvec import TaskSet

EXPORT_FORMATS = ("full", "peft")


@command
def plan(
    out: Path = typer.Option(..., "--out", help="where to write the merge path (JSON)"),
    base: Optional[Path] = BaseOpt, model: Optional[list[str]] = ModelOpt, method: Optional[str] = MethodOpt,
    param: Optional[list[str]] = ParamOpt, weight: Optional[list[str]] = WeightOpt,
    granularity: Optional[str] = GranOpt, planner: Optional[str] = PlannerOpt,
    linkage: Optional[str] = LinkageOpt, mode: Optional[str] = ModeOpt, measure: Optional[str] = MeasureOpt,
    seed: Optional[int] = SeedOpt, config: Optional[Path] = ConfigOpt, allow_mixed_dtypes: Optional[bool] = MixedOpt,
    executor: Optional[str] = ExecOpt, ray_address: Optional[str] = RayOpt,
    max_relative_change: Optional[float] = RelOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing path file at --out"),
    task_specific: Optional[list[str]] = SpecificOpt, device: Optional[str] = DeviceOpt,
    input_hash: Optional[str] = HashOpt,
) -> None:
    """Compute the whole merge path (Mx down to the smallest size) and write it as JSON.

    Example: flexmerge plan --base base.safetensors --model a=a.safetensors --model b=b.safetensors
    --method ties --out path.json
    """
    check_target(out, overwrite, is_path_file, "a flexmerge path file")  # before minutes of work, not after
    cfg = merge_config(config, base=base, model=model, method=method, param=param, weight=weight,
                       granularity=granularity, planner=planner, linkage=linkage, mode=mode, measure=measure, seed=seed,
                       mixed=allow_mixed_dtypes, executor=executor, ray_address=ray_address,
                       max_relative_change=max_relative_change, task_specific=task_specific, device=device,
                       input_hash=input_hash)
    ex = get_executor(cfg.executor, address=cfg.ray_address)
    tasks = load_for_merge(cfg.base, cfg.models, method=cfg.method, params=cfg.params, planner=cfg.planner,
                           merging=False, executor=ex, **cfg.load_options())
    path = plan_path(tasks, method=cfg.method, params=cfg.params, executor=ex, device=cfg.device,
                     options=cfg.plan_options(), **cfg.partition_options())
    path.save(out, overwrite=overwrite)
    console.print(f"{len(path.block_names)} blocks, {path.num_points} points, sizes {path.sizes[0]:.3f}x -> "
                  f"{path.min_size:.3f}x; similarity pass {path.timings['similarity_pass']:.2f}s, "
                  f"path {path.timings['path']:.4f}s")
    console.print(_size_table(tasks, path))
    console.print(f"wrote {escape(str(out))}", soft_wrap=True)


def _size_table(tasks: TaskSet, path: MergePath, rows: int = 12) -> Table:
    """A compact size -> bytes table of the path: what each point costs on disk, everything counted."""
    unit = path_unit(tasks, path)
    points = sorted(set(range(0, path.num_points, max(1, path.num_points // (rows - 1)))) | {path.num_points - 1})
    table = Table("point", "size", "bytes (all stored)", title="size -> bytes along the path")
    for p in points:
        table.add_row(str(p), f"{path.sizes[p]:.3f}x", format_bytes(path.sizes[p] * unit.nbytes + tasks.frozen_bytes()))
    return table


@command
def merge(
    out: Path = typer.Option(..., "--out", help="artifact directory to write"),
    size: Optional[str] = typer.Option(None, "--size", help="target size in model units (one unit: one whole "
                                       "fine-tune as stored), 1 <= size <= M; max: every fine-tune as it is; "
                                       "min: the smallest point"),
    base: Optional[Path] = BaseOpt, model: Optional[list[str]] = ModelOpt, method: Optional[str] = MethodOpt,
    param: Optional[list[str]] = ParamOpt, weight: Optional[list[str]] = WeightOpt,
    granularity: Optional[str] = GranOpt, planner: Optional[str] = PlannerOpt,
    linkage: Optional[str] = LinkageOpt, mode: Optional[str] = ModeOpt, measure: Optional[str] = MeasureOpt,
    seed: Optional[int] = SeedOpt, config: Optional[Path] = ConfigOpt, allow_mixed_dtypes: Optional[bool] = MixedOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing artifact at --out"),
    executor: Optional[str] = ExecOpt, ray_address: Optional[str] = RayOpt,
    resume: bool = typer.Option(True, "--resume/--no-resume",
                                help="continue an interrupted run of the same merge (default) or start over"),
    max_relative_change: Optional[float] = RelOpt,
    task_specific: Optional[list[str]] = SpecificOpt,
    max_bytes: Optional[str] = typer.Option(None, "--max-bytes",
                                            help="storage budget instead of --size, e.g. 300MB or 1.5GiB: the largest "
                                                 "point whose artifact (frozen, task-specific, masks, θ0 included) fits"),
    device: Optional[str] = DeviceOpt, input_hash: Optional[str] = HashOpt,
) -> None:
    """Merge to a target size (or within a storage budget) and write the flex-model artifact.

    Example: flexmerge merge --base base.safetensors --model a=a.safetensors --model b=b.safetensors
    --model c=c.safetensors --method ties --size 2 --out flex-2x
    """
    flags = dict(base=base, model=model, method=method, param=param, weight=weight, granularity=granularity,
                 planner=planner, linkage=linkage, mode=mode, measure=measure, seed=seed, mixed=allow_mixed_dtypes,
                 size=size, executor=executor, ray_address=ray_address, max_relative_change=max_relative_change,
                 task_specific=task_specific, max_bytes=max_bytes, device=device, input_hash=input_hash)
    if is_multi_stage(config):  # mergekit-multi's stages: the ones before the last at 1x into OUT.stages/NAME
        manifest = merge_stages(config, config_fields(**flags), out, overwrite=overwrite, resume=resume,
                                log=lambda line: console.print(escape(line), soft_wrap=True))
        requested = manifest.get("info", {}).get("requested_size")
        asked = f"{requested:g}x" if isinstance(requested, (int, float)) else str(requested)
    else:
        cfg = merge_config(config, **flags)
        if cfg.size is None and cfg.max_bytes is None:
            raise FlexMergeError("--size or --max-bytes (or `size:` / `max_bytes:` in --config) is required")
        manifest = merge_from_config(cfg, out, overwrite=overwrite, resume=resume)
        asked = (f"{cfg.size:g}x" if isinstance(cfg.size, float) else str(cfg.size)) if cfg.size is not None \
            else f"at most {format_bytes(cfg.max_bytes)}"
    total = manifest["stored_bytes"] + manifest["frozen_bytes"] + manifest["task_specific_bytes"]
    console.print(f"wrote {escape(str(out))}: {len(manifest['tasks'])} tasks, method {manifest['method']['name']}, "
                  f"size {manifest['size']:.4f}x, {format_bytes(total)} (asked {asked})", soft_wrap=True)
    note = cut_note(manifest)
    if note:
        console.print(note, soft_wrap=True)


def cut_note(manifest: dict[str, Any]) -> str | None:
    """One line when the artifact is smaller than asked: which path point it is, and why not larger."""
    info, size = manifest.get("info", {}), manifest["size"]
    asked = info.get("requested_size")
    if not isinstance(asked, (int, float)) or size >= asked - SIZE_TOLERANCE:
        return None
    up = info.get("next_size_up")
    why = (f"the next point up is {up:.4f}x, above {asked:.4g}x" if up is not None
           else "every other point stores at least one more copy of a block")
    return (f"note: took path point {info.get('path_point')} of {info.get('path_points', 0) - 1} at {size:.4f}x, "
            f"the largest not above {asked:.4g}x: {why}")


@command
def inspect(
    artifact: Path = typer.Argument(..., help="flex-model directory"),
    as_json: bool = typer.Option(False, "--json", help="print the manifest summary as JSON"),
) -> None:
    """Show a flex model's tasks, method, size, blocks and groups.

    Example: flexmerge inspect flex-2x --json
    """
    summary = artifact_summary(artifact)
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=1) + "\n")
        return
    console.print(f"tasks: {', '.join(summary['tasks'])}")
    console.print(f"method: {summary['method']}")
    console.print(f"size: {summary['size']:.4f}x, in units of one whole fine-tune as stored (its own parameters "
                  f"included): {summary['unit_bytes']:.0f} bytes", soft_wrap=True)
    console.print(f"stored: {summary['stored_bytes']} bytes in blocks, {summary['task_specific_bytes']} bytes of "
                  f"task-specific parameters, {summary['frozen_bytes']} bytes of frozen shared parameters",
                  soft_wrap=True)
    for t, keys in summary["task_specific"].items():
        added = summary["added_rows"].get(t, {})
        named = [f"{k} ({added[k]} added rows)" if k in added else k for k in keys]
        console.print(f"  {t} keeps its own: {', '.join(named[:6])}{' ...' if len(keys) > 6 else ''}", soft_wrap=True)
    table = Table("block", "groups")
    for b in summary["blocks"]:
        table.add_row(b["name"], "  ".join("{" + ",".join(g) + "}" for g in b["groups"]))
    console.print(table)


@command
def export(
    artifact: Path = typer.Argument(..., help="flex-model directory"),
    out: Path = typer.Option(..., "--out", help="--format full: a .safetensors file, or a directory (HF layout when "
                             "inputs were HF); --format peft: a directory (OUT/base, OUT/adapters/<task>)"),
    task: Optional[str] = typer.Option(None, "--task", help="which task's model to export (--format full)"),
    fmt: str = typer.Option("full", "--format", help="full: one task's whole checkpoint; peft: one shared base model "
                            "+ one PEFT LoRA adapter per task, for peft and vLLM (Hugging Face models only)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier flexmerge export (nothing else)"),
    out_dtype: Optional[str] = typer.Option(None, "--out-dtype",
                                            help="--format full: cast the weights: float32 | float16 | bfloat16 "
                                                 "[default: as stored]"),
    max_shard_size: Optional[str] = typer.Option(None, "--max-shard-size",
                                                 help="largest weight file of a directory export (peft: of the base), "
                                                      "e.g. 5GB or 500MB; bigger models are sharded with an index "
                                                      "[default: 5GB]"),
    rank: Optional[int] = typer.Option(None, "--rank", help="--format peft: keep at most R singular directions of "
                                       "each adapted weight's delta (R >= 1); default: every one above float "
                                       "noise (lossless)"),
    energy: Optional[float] = typer.Option(None, "--energy", help="--format peft: keep the fewest singular directions "
                                           "holding this fraction (0 < E <= 1) of each delta's energy Σσ²"),
    norms: str = typer.Option("fold", "--norms", help="--format peft: fold: norms that differ per task are folded into "
                              "the LoRA of the Linear layers reading them where exact (adapters stay plain LoRA: peft "
                              "mixed batches, vLLM); save: saved whole as modules_to_save (lower ranks, but peft runs "
                              "them one adapter at a time and vLLM refuses them)"),
) -> None:
    """Write one task's full checkpoint (a .safetensors file, or a directory as save_pretrained writes
    it, with a model card), or with --format peft every task as a LoRA adapter of one shared base.

    Examples: flexmerge export flex-2x --task sst2 --out sst2-model/ --out-dtype bfloat16 --max-shard-size 2GB;
    flexmerge export flex-2x --format peft --rank 64 --out flex-peft/
    """
    if fmt not in EXPORT_FORMATS:
        raise UnknownNameError("export format", fmt, EXPORT_FORMATS)
    if fmt == "full":
        peft_only = [flag for flag, value in (("--rank", rank), ("--energy", energy)) if value is not None]
        if norms != "fold":
            peft_only.append("--norms")
        if peft_only:
            raise ConfigError(f"{peft_only[0]} is an option of --format peft")
        if task is None:
            raise ConfigError("--task is required: which task's model to export (or --format peft for all of them)")
        written = export_task(load(artifact), task, out, overwrite=overwrite, out_dtype=out_dtype,
                              max_shard_size=max_shard_size)
        console.print(f"wrote {escape(str(written))}", soft_wrap=True)
        return
    if task is not None:
        raise ConfigError("--format peft exports every task; --task is for --format full")
    if out_dtype is not None:
        raise ConfigError("--out-dtype is an option of --format full (a peft export keeps the stored dtype)")
    check_target(out, overwrite, is_peft_export, "a flexmerge peft export")  # before loading the artifact
    result = export_peft(load(artifact), out, rank=rank, energy=energy, norms=norms, overwrite=overwrite,
                         max_shard_size=max_shard_size)
    for name, report in result.reports.items():
        console.print(f"{escape(name)}: {escape(report.summary())}", soft_wrap=True)
    for note in result.notes:
        console.print(f"note: {escape(note)}", soft_wrap=True)
    if not result.mixed_batches:
        console.print("note: peft cannot run these adapters in one mixed batch (adapter_names): a module saved whole "
                      "is not a Linear or Embedding layer", soft_wrap=True)
    console.print(f"wrote {escape(str(result.path))} (base/ and adapters/)", soft_wrap=True)


@command
def methods() -> None:
    """List the merging methods and their hyperparameters (with defaults)."""
    table = Table("method", "what it stores", "hyperparameters (default)")
    for name, cls in available_methods().items():
        params = ", ".join(f"{k} (required)" if f.is_required()
                           else f"{k}={f.get_default(call_default_factory=True)!r}"
                           for k, f in cls.Params.model_fields.items())
        table.add_row(name, cls.summary, params)
    console.print(table)
