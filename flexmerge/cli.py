"""The `flexmerge` command line. Each command calls one public function of the library."""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flexmerge.errors import FlexMergeError
from flexmerge.extras import missing_extra_error, require_extra
from flexmerge.size import format_bytes

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Merge M fine-tuned models into one artifact of any size between 1x and Mx.")
console = Console(highlight=False)
err = Console(stderr=True)

BaseOpt = typer.Option(None, "--base", help="base checkpoint: .safetensors, sharded index.json, .pt/.bin or HF dir")
ModelOpt = typer.Option(None, "--model", help="a fine-tuned model as NAME=PATH (repeat for each task)")
MethodOpt = typer.Option(None, "--method", help="merging method (see `flexmerge methods`), optionally with its "
                                                "parameters: ties:keep=0.3 (as sweep --methods) [default: task_arithmetic]")
ParamOpt = typer.Option(None, "--param", help="method hyperparameter KEY=VALUE, e.g. lam=1.0 (repeatable)")
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
                                "Hugging Face heads (classifier, score, qa_outputs) are detected without one")
HashOpt = typer.Option(None, "--input-hash",
                       help="fingerprint of every input's content (provenance, resume): xxh3_128 (default, "
                            "~25 GB/s) | sha256 (cryptographic, ~1.7 GB/s per core)")
MixedOpt = typer.Option(None, "--allow-mixed-dtypes/--no-allow-mixed-dtypes", help="merge inputs of different float dtypes")


_STATE = {"debug": bool(os.environ.get("FLEXMERGE_DEBUG"))}


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="show the Python traceback of an unexpected error")
             ) -> None:
    """Merge M fine-tuned models into one artifact of any size between 1x and Mx."""
    _STATE["debug"] = debug or _STATE["debug"]


def _say(message: str) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)


def _os_error_message(e: OSError) -> str:
    what = e.strerror or str(e)
    where = f" {e.filename}" if e.filename else ""
    hint = {errno.ENOSPC: "free some space or choose another output",
            errno.EACCES: "check the file's permissions", errno.EPERM: "check the file's permissions",
            errno.EROFS: "choose an output on a writable filesystem"}.get(e.errno, "")
    return f"cannot access{where}: {what}" + (f" ({hint})" if hint else "")


def guarded(command: Callable) -> Callable:
    """The CLI's one error boundary: a user error (bad input, bad option, unreadable or unwritable
    file, full disk) is one line on stderr and exit 2; anything else is an internal error that
    says so, exit 1, with the traceback only under --debug."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):  # typer's own exits and usage errors
            raise
        except FlexMergeError as e:
            _say(str(e))
            raise typer.Exit(2) from None
        except OSError as e:
            if _STATE["debug"]:
                raise
            _say(_os_error_message(e))
            raise typer.Exit(2) from None
        except ModuleNotFoundError as e:
            missing = missing_extra_error(e)
            if missing is None:
                _internal_error(e)
            _say(str(missing))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            _say("interrupted; a resumable merge continues where it stopped when the same command is rerun")
            raise typer.Exit(130) from None
        except Exception as e:
            _internal_error(e)
    return run


def _internal_error(e: Exception) -> NoReturn:
    """Anything that is not the user's doing: say so (exit 1); the traceback only under --debug."""
    if _STATE["debug"]:
        raise e
    _say(f"internal error ({type(e).__name__}: {e}); this is a bug in flexmerge, not in your input. "
         "Rerun with --debug (flexmerge --debug COMMAND ...) for the traceback and report it.")
    raise typer.Exit(1) from None


def command(f: Callable) -> Callable:
    return app.command()(guarded(f))


def _parse_params(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FlexMergeError(f"--param {item!r} must be KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _config(config, base, model, method, param, granularity, planner, linkage, mode, measure, seed, mixed,
            size=None, executor=None, ray_address=None, max_relative_change=None, task_specific=None,
            max_bytes=None, device=None, input_hash=None):
    from flexmerge.config import build_config
    from flexmerge.taskvec import parse_task_specs

    models = parse_task_specs(model) if model else None
    return build_config(config, {
        "base": base, "models": models, "method": method, "params": _parse_params(param),
        "granularity": granularity, "planner": planner, "linkage": linkage, "mode": mode,
        "measure": measure, "seed": seed, "allow_mixed_dtypes": mixed, "size": size,
        "executor": executor, "ray_address": ray_address, "max_relative_change": max_relative_change,
        "task_specific": task_specific or None, "max_bytes": max_bytes, "device": device, "input_hash": input_hash,
    })


def _size_table(tasks, path, rows: int = 12) -> Table:
    """A compact size -> bytes table of the path: what each point costs on disk, everything counted."""
    from flexmerge.api import path_unit

    unit = path_unit(tasks, path)
    points = sorted(set(range(0, path.num_points, max(1, path.num_points // (rows - 1)))) | {path.num_points - 1})
    table = Table("point", "size", "bytes (all stored)", title="size -> bytes along the path")
    for p in points:
        table.add_row(str(p), f"{path.sizes[p]:.3f}x", format_bytes(path.sizes[p] * unit.nbytes + tasks.frozen_bytes()))
    return table


def _executor(cfg):
    from flexmerge.executors import get_executor

    return get_executor(cfg.executor, address=cfg.ray_address)


def _load(cfg, executor, observers=(), key_grams: bool = True):
    from flexmerge.taskvec import load_tasks

    return load_tasks(cfg.base, cfg.models, task_specific=cfg.task_specific, allow_mixed_dtypes=cfg.allow_mixed_dtypes,
                      max_relative_change=cfg.max_relative_change, executor=executor, input_hash=cfg.input_hash,
                      observers=observers, key_grams=key_grams)


@command
def plan(
    out: Path = typer.Option(..., "--out", help="where to write the merge path (JSON)"),
    base: Optional[Path] = BaseOpt, model: Optional[list[str]] = ModelOpt, method: Optional[str] = MethodOpt,
    param: Optional[list[str]] = ParamOpt, granularity: Optional[str] = GranOpt, planner: Optional[str] = PlannerOpt,
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
    from flexmerge._atomic import check_target
    from flexmerge.api import first_pass_for, uses_key_grams
    from flexmerge.api import plan as plan_fn
    from flexmerge.planning.path import is_path_file

    check_target(out, overwrite, is_path_file, "a flexmerge path file")  # before minutes of work, not after
    cfg = _config(config, base, model, method, param, granularity, planner, linkage, mode, measure, seed,
                  allow_mixed_dtypes, None, executor, ray_address, max_relative_change, task_specific, device=device,
                  input_hash=input_hash)
    ex = _executor(cfg)
    tasks = _load(cfg, ex, first_pass_for(cfg.method, cfg.params, merging=False),
                  uses_key_grams(cfg.method, cfg.params, planner=cfg.planner))
    path = plan_fn(tasks, method=cfg.method, params=cfg.params, executor=ex, device=cfg.device, **cfg.plan_options())
    path.save(out, overwrite=overwrite)
    console.print(f"{len(path.block_names)} blocks, {path.num_points} points, sizes {path.sizes[0]:.3f}x -> "
                  f"{path.min_size:.3f}x; similarity pass {path.timings['similarity_pass']:.2f}s, "
                  f"path {path.timings['path']:.4f}s")
    console.print(_size_table(tasks, path))
    console.print(f"wrote {escape(str(out))}", soft_wrap=True)


@command
def merge(
    out: Path = typer.Option(..., "--out", help="artifact directory to write"),
    size: Optional[str] = typer.Option(None, "--size", help="target size in model units (one unit: one whole "
                                       "fine-tune as stored), 1 <= size <= M; max: every fine-tune as it is; "
                                       "min: the smallest point"),
    base: Optional[Path] = BaseOpt, model: Optional[list[str]] = ModelOpt, method: Optional[str] = MethodOpt,
    param: Optional[list[str]] = ParamOpt, granularity: Optional[str] = GranOpt, planner: Optional[str] = PlannerOpt,
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
    from flexmerge._atomic import check_target
    from flexmerge.api import first_pass_for, merge_to_disk, uses_key_grams
    from flexmerge.flexmodel.artifact import is_artifact

    check_target(out, overwrite, is_artifact, "a flex-model artifact")  # before the validation pass, not after
    cfg = _config(config, base, model, method, param, granularity, planner, linkage, mode, measure, seed,
                  allow_mixed_dtypes, size, executor, ray_address, max_relative_change, task_specific, max_bytes,
                  device, input_hash)
    if cfg.size is None and cfg.max_bytes is None:
        raise FlexMergeError("--size or --max-bytes (or `size:` / `max_bytes:` in --config) is required")
    ex = _executor(cfg)
    tasks = _load(cfg, ex, first_pass_for(cfg.method, cfg.params),
                  uses_key_grams(cfg.method, cfg.params, cfg.size, cfg.max_bytes, cfg.planner))
    manifest = merge_to_disk(tasks, out, size=cfg.size, max_bytes=cfg.max_bytes, method=cfg.method,
                             params=cfg.params, overwrite=overwrite, executor=ex, resume=resume, device=cfg.device,
                             **cfg.plan_options())
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
    from flexmerge.planning.path import SIZE_TOLERANCE

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
    from flexmerge.flexmodel.artifact import read_manifest

    m = read_manifest(artifact)
    tasks = m["tasks"]
    blocks = [{"name": b["name"], "groups": [[tasks[t] for t in g] for g in b["groups"]]} for b in m["blocks"]]
    summary = {"tasks": tasks, "method": m["method"], "size": m["size"], "unit_bytes": m["unit_bytes"],
               "stored_bytes": m["stored_bytes"], "frozen_bytes": m["frozen_bytes"],
               "task_specific_bytes": m.get("task_specific_bytes", 0),
               "task_specific": {t: sorted(keys) for t, keys in m.get("task_specific", {}).items()},
               "granularity": m["granularity"], "flexmerge_version": m["flexmerge_version"], "blocks": blocks}
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=1) + "\n")
        return
    console.print(f"tasks: {', '.join(tasks)}")
    console.print(f"method: {m['method']}")
    console.print(f"size: {m['size']:.4f}x, in units of one whole fine-tune as stored (its own parameters "
                  f"included): {m['unit_bytes']:.0f} bytes", soft_wrap=True)
    console.print(f"stored: {m['stored_bytes']} bytes in blocks, {summary['task_specific_bytes']} bytes of "
                  f"task-specific parameters, {m['frozen_bytes']} bytes of frozen shared parameters", soft_wrap=True)
    for t, keys in summary["task_specific"].items():
        console.print(f"  {t} keeps its own: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}", soft_wrap=True)
    table = Table("block", "groups")
    for b in blocks:
        table.add_row(b["name"], "  ".join("{" + ",".join(g) + "}" for g in b["groups"]))
    console.print(table)


@command
def export(
    artifact: Path = typer.Argument(..., help="flex-model directory"),
    task: str = typer.Option(..., "--task", help="which task's model to export"),
    out: Path = typer.Option(..., "--out", help="a .safetensors file, or a directory (HF layout when inputs were HF)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier flexmerge export (nothing else)"),
    out_dtype: Optional[str] = typer.Option(None, "--out-dtype",
                                            help="cast the weights: float32 | float16 | bfloat16 [default: as stored]"),
    max_shard_size: Optional[str] = typer.Option(None, "--max-shard-size",
                                                 help="largest weight file of a directory export, e.g. 5GB or 500MB; "
                                                      "bigger models are sharded with an index [default: 5GB]"),
) -> None:
    """Write one task's full checkpoint: a .safetensors file, or a directory as save_pretrained
    writes it (shards + index, config, tokenizer, generation config, chat template) with a model card.

    Example: flexmerge export flex-2x --task sst2 --out sst2-model/ --out-dtype bfloat16 --max-shard-size 2GB
    """
    from flexmerge.flexmodel import export as export_fn
    from flexmerge.flexmodel import load

    written = export_fn(load(artifact), task, out, overwrite=overwrite, out_dtype=out_dtype,
                        max_shard_size=max_shard_size)
    console.print(f"wrote {escape(str(written))}", soft_wrap=True)


@command
def methods() -> None:
    """List the merging methods and their hyperparameters (with defaults)."""
    from flexmerge.methods import available_methods

    table = Table("method", "what it stores", "hyperparameters (default)")
    for name, cls in available_methods().items():
        params = ", ".join(f"{k}={f.default!r}" for k, f in cls.Params.model_fields.items())
        table.add_row(name, cls.summary, params)
    console.print(table)


DEFAULT_METHODS = "task_arithmetic,ties,emr,consensus"
DEFAULT_SIZES = "1,1.5,2,3,4,8"


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FlexMergeError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _check_names(methods: str, planners: str) -> None:
    """A typo in a method or planner fails now, before any training or validation pass."""
    from flexmerge.curve import spec_method
    from flexmerge.errors import UnknownNameError
    from flexmerge.planning import PLANNERS

    for m in _names(methods):
        spec_method(m)  # a typo or a bad parameter (twin:rank=x)
    for p in _names(planners):
        if p not in PLANNERS:
            raise UnknownNameError("planner", p, PLANNERS)


def _run_suite(suite_name: str, out: Path, methods: str, sizes: str, planners: str, granularity: str,
               cache_dir: Optional[Path], rebuild: bool, routed: bool = False) -> None:
    from flexmerge.suites import get_suite, run_sweep

    _check_names(methods, planners)
    suite = get_suite(suite_name)
    require_extra("suites", f"the {suite_name!r} suite")
    result, paths = run_sweep(suite, out, methods=_names(methods), sizes=_floats(sizes, "--sizes"),
                              planners=_names(planners), granularity=granularity, cache_dir=cache_dir,
                              rebuild=rebuild, routed=routed, log=lambda msg: err.print(f"[dim]{msg}[/]"))
    _print_sweep(result, paths, f"{suite.name}: mean normalized accuracy (merged / fine-tuned)")


def _run_own(cfg, out: Path, methods: str, sizes: str, planners: str, evaluator: Optional[str],
             eval_data: Optional[list[str]], eval_limit: int, eval_batch_size: int) -> None:
    """A sweep of the user's own models, scored by their evaluator or on their labelled text. A
    --config's `params` apply to its `method` when --methods includes it. Sizes mean what
    `flexmerge merge --size` means (each task's own head counts), so a row is the artifact that
    merge would write."""
    from flexmerge.curve import sweep as sweep_fn
    from flexmerge.evaluation import TextClassificationEvaluator, load_evaluator
    from flexmerge.report import write_results
    from flexmerge.taskvec import parse_task_specs

    _check_names(methods, planners)
    if (evaluator is None) == (not eval_data):
        raise FlexMergeError("own models need exactly one of --evaluator package.module:function or "
                             "--eval-data TASK=FILE (one per task)")
    score = load_evaluator(evaluator) if evaluator else None
    tasks = _load(cfg, _executor(cfg))
    if score is None:
        score = TextClassificationEvaluator(tasks, parse_task_specs(eval_data), limit=eval_limit,
                                            batch_size=eval_batch_size)
    result = sweep_fn(tasks, score, methods=_names(methods), sizes=_floats(sizes, "--sizes"), planners=_names(planners),
                      params={cfg.method: cfg.params} if cfg.params else None, granularity=cfg.granularity,
                      linkage=cfg.linkage, seed=cfg.seed, device=cfg.device, log=lambda msg: err.print(f"[dim]{msg}[/]"))
    result.meta.update({"base": str(cfg.base), "models": {k: str(v) for k, v in cfg.models.items()},
                        "evaluator": evaluator or {"eval_data": list(eval_data or []), "limit": eval_limit}})
    _print_sweep(result, write_results(result, out), "mean normalized score (merged / fine-tuned)")


def _print_sweep(result, paths, title: str) -> None:
    from flexmerge.report import AREA_LABEL, area_ranking, summary_rows

    header, rows = summary_rows(result)
    table = Table(*header, title=title)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"ranking by {AREA_LABEL} (mean normalized accuracy over that span): "
                  + " > ".join(f"{c} {a:.3f}" for c, a in area_ranking(result)), soft_wrap=True)
    ft = sum(result.finetuned.values()) / len(result.finetuned)
    line = f"fine-tuned mean accuracy {ft:.3f} (" + ", ".join(f"{t} {v:.3f}" for t, v in result.finetuned.items()) + ")"
    if result.base:
        line += f"; base encoder + trained head {sum(result.base.values()) / len(result.base):.3f}"
    console.print(line, soft_wrap=True)
    for curve, points in result.curves().items():
        if "router_accuracy" in points[0]:
            console.print(f"{curve}: router accuracy (mean over tasks) " + ", ".join(
                f"{p['router_accuracy']:.3f} at {p['size']:.3f}x" for p in points), soft_wrap=True)
    console.print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items()), soft_wrap=True)
    console.print(f"plots: {paths['normalized_plot']}  {paths['accuracy_plot']}", soft_wrap=True)
    console.print(f"tables: {paths['csv']}  {paths['json']}  {paths['ranking']}  {paths['areas']}", soft_wrap=True)


SuiteOpt = typer.Option(None, "--suite", help="benchmark suite: wordnet (default) | wordnet20 | wordnet30 | digits | fashion")
CacheOpt = typer.Option(None, "--cache-dir", help="where fine-tuned zoos are cached [default: ~/.cache/flexmerge]")
RebuildOpt = typer.Option(False, "--rebuild", help="retrain the zoo even if a verified cached one exists")


@command
def sweep(
    suite: Optional[str] = SuiteOpt,
    methods: str = typer.Option(DEFAULT_METHODS, "--methods",
                                help="comma-separated merging methods, each optionally with parameters: "
                                     "twin:rank=4:base=ties"),
    sizes: str = typer.Option(DEFAULT_SIZES, "--sizes", help="comma-separated sizes (sizes above M are dropped)"),
    planners: str = typer.Option("greedy", "--planners",
                                 help="comma-separated: greedy, output (data-aware: the suite's unlabelled "
                                      "validation inputs), recon, left-right, right-left, random, channel, "
                                      "cluster"),
    granularity: Optional[str] = GranOpt,
    out: Path = typer.Option(Path("results"), "--out", help="directory for results.csv/json, areas.csv, ranking.md, plots"),
    cache_dir: Optional[Path] = CacheOpt,
    rebuild: bool = RebuildOpt,
    base: Optional[Path] = BaseOpt, model: Optional[list[str]] = ModelOpt, config: Optional[Path] = ConfigOpt,
    task_specific: Optional[list[str]] = SpecificOpt,
    evaluator: Optional[str] = typer.Option(None, "--evaluator",
                                            help="own models: package.module:function, called as "
                                                 "(task, state_dict) -> score (higher is better)"),
    eval_data: Optional[list[str]] = typer.Option(None, "--eval-data",
                                                  help="own HF text-classification models: TASK=FILE, a JSONL or "
                                                       "CSV file with text and label columns (one per task)"),
    eval_limit: int = typer.Option(1000, "--eval-limit", help="with --eval-data: examples per task, at most"),
    eval_batch_size: int = typer.Option(32, "--eval-batch-size", help="with --eval-data: inputs per forward pass"),
    device: Optional[str] = typer.Option(None, "--device", help="own models: where preprocessing, the similarity "
                                         "pass and merging compute: cpu (default) | auto | cuda | cuda:N"),
    routed: bool = typer.Option(False, "--routed",
                                help="text suites, twin methods: also evaluate each twin point on the mixed test set "
                                     "WITHOUT task ids, routed by a router trained on the validation split "
                                     "(curves '<spec> routed', with the router's accuracy)"),
) -> None:
    """Sweep sizes and methods: the accuracy-size curves, on a benchmark suite or on your own models.

    Examples: flexmerge sweep --suite wordnet --methods task_arithmetic,ties,emr,consensus
    --sizes 1,1.5,2,3,4,8 --out results/

    flexmerge sweep --base base/ --model sst2=ft-sst2/ --model mnli=ft-mnli/
    --eval-data sst2=sst2-dev.jsonl --eval-data mnli=mnli-dev.csv --sizes 1,1.5,2 --out results/

    flexmerge sweep --config merge.yaml --evaluator myproject.evals:score --out results/

    flexmerge sweep --suite wordnet --methods task_arithmetic,twin:rank=2,twin:rank=15 --sizes 1,1.1,1.5 --routed
    """
    own = base is not None or model or config is not None
    if own and suite is not None:
        raise FlexMergeError("give either --suite or your own models (--base/--model or --config), not both")
    if not own and (evaluator or eval_data or task_specific or device):
        raise FlexMergeError("--evaluator, --eval-data, --task-specific and --device go with your own models "
                             "(--base and --model, or --config)")
    if own and routed:
        raise FlexMergeError("--routed goes with --suite (a text suite's validation split trains the router)")
    if not own:
        _run_suite(suite or "wordnet", out, methods, sizes, planners, granularity or "sublayer", cache_dir, rebuild,
                   routed)
        return
    cfg = _config(config, base, model, None, None, granularity, None, None, None, None, None, None,
                  task_specific=task_specific, device=device)
    _run_own(cfg, out, methods, sizes, planners, evaluator, eval_data, eval_limit, eval_batch_size)


@command
def demo(
    suite: str = typer.Option("wordnet", "--suite", help="benchmark suite: wordnet | wordnet20 | wordnet30 | digits | "
                              "fashion"),
    out: Optional[Path] = typer.Option(None, "--out", help="results directory [default: results/demo-<suite>]"),
    cache_dir: Optional[Path] = CacheOpt,
    rebuild: bool = RebuildOpt,
) -> None:
    """Build (or reuse) a suite's model zoo and run the default sweep; print the table and plots.

    Example: flexmerge demo            (wordnet: ~10 min the first time, then minutes)
             flexmerge demo --suite digits   (seconds)
    """
    _run_suite(suite, out or Path("results") / f"demo-{suite}", DEFAULT_METHODS, DEFAULT_SIZES, "greedy",
               "sublayer", cache_dir, rebuild)


@command
def serve(
    artifact: Optional[Path] = typer.Argument(None, help="flex-model directory (Hugging Face inputs: text tasks); "
                                                         "or --suite instead"),
    suite: Optional[str] = typer.Option(None, "--suite", help="instead of DIR: a text suite's zoo (wordnet | "
                                                               "wordnet20), merged to --size (built or reused)"),
    size: Optional[float] = typer.Option(None, "--size", help="with --suite: size to merge to, 1 <= size <= M"),
    method: Optional[str] = typer.Option(None, "--method", help="with --suite: merging method, optionally with its "
                                         "parameters, e.g. twin:rank=7 [default: task_arithmetic]"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="with --suite: where zoos and served artifacts "
                                                                       "are cached [default: ~/.cache/flexmerge]"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8000, "--port", help="TCP port to listen on"),
    max_batch: int = typer.Option(32, "--max-batch", help="most inputs in one forward pass, across tasks"),
    batch_wait_ms: float = typer.Option(5.0, "--batch-wait-ms",
                                        help="how long a request waits for others to share its forward pass"),
    max_inputs: int = typer.Option(64, "--max-inputs", help="most inputs in one request (more: 413)"),
    max_chars: int = typer.Option(2000, "--max-chars", help="most characters in one input (more: 413)"),
) -> None:
    """Serve every task of a flex model over HTTP (JSON): /health, /tasks, /v1/tasks/TASK/predict.

    Concurrent requests, of any tasks, share forward passes. SIGTERM or Ctrl-C stops it gracefully.
    See docs/serving.md.

    Example: flexmerge serve flex-2x --port 8000
             flexmerge serve --suite wordnet --size 2     (the zoo merged to 2x, with its heads)
             curl localhost:8000/tasks
    """
    if artifact is not None and suite is not None:
        raise FlexMergeError("give an artifact directory or --suite NAME --size S, not both")
    if artifact is None and suite is None:
        raise FlexMergeError("give an artifact directory (flexmerge serve DIR) or --suite NAME --size S")
    if artifact is not None and (size, method, cache_dir) != (None, None, None):
        raise FlexMergeError("--size, --method and --cache-dir go with --suite; an artifact has its size already")
    if suite is not None and size is None:
        raise FlexMergeError(f"--suite {suite} needs --size S: the size to merge its zoo to")
    require_extra("serve", "flexmerge serve")
    from flexmerge.serve import Runtime
    from flexmerge.serve.runtime import suite_artifact
    from flexmerge.serve.server import create_app, run_server

    if suite is not None:
        from flexmerge.suites import get_suite

        the_suite = get_suite(suite)
        artifact, zoo = suite_artifact(the_suite, size, method or "task_arithmetic", cache_dir,
                                       log=lambda msg: err.print(f"[dim]{escape(msg)}[/]"))
        err.print(f"[dim]serving {escape(str(artifact))}[/]", soft_wrap=True)
        runtime = Runtime.load(artifact, **the_suite.serve_options(zoo))
    else:
        runtime = Runtime.load(artifact)
    # one input per task before listening: the models are built now (not in the first request),
    # and an artifact that cannot run fails here, with a message, instead of in every request
    runtime.predict_mixed([(task, "warm up") for task in runtime.tasks])
    app = create_app(runtime, max_inputs=max_inputs, max_chars=max_chars, max_batch=max_batch,
                     batch_wait_ms=batch_wait_ms)
    run_server(app, host=host, port=port, log_level="info")


route_app = typer.Typer(no_args_is_help=True, help="Routed inference (Twin-Merging): inputs of unknown task.")
app.add_typer(route_app, name="route")


def _calibration(path: Path) -> list[tuple[str, str]]:
    """JSON lines {"text": ..., "task": ...}: the (input, task) examples a router learns from."""
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pairs.append((str(row["text"]), str(row["task"])))
        except (ValueError, KeyError, TypeError):
            raise FlexMergeError(f"{path}:{n}: not a JSON object with 'text' and 'task'") from None
    return pairs


def _suite_runtime(artifact: Path, name: str, cache_dir: Optional[Path]) -> tuple[Any, dict[str, Any]]:
    """(suite, Runtime options: tokenizer, config, heads) for an artifact merged from a text suite's
    zoo (whose files hold no Hugging Face config); the artifact's tasks must be the suite's."""
    from flexmerge.flexmodel.artifact import read_manifest
    from flexmerge.suites import get_suite, get_zoo

    suite = get_suite(name)
    reason = suite.serving_reason() or suite.unavailable_reason()
    if reason:
        raise FlexMergeError(f"--suite {name}: {reason}")
    tasks = read_manifest(artifact)["tasks"]
    if sorted(tasks) != sorted(suite.task_names()):
        raise FlexMergeError(f"{artifact} holds the tasks {', '.join(tasks)}, not the {name} suite's "
                             f"({', '.join(suite.task_names())})")
    return suite, suite.serve_options(get_zoo(suite, cache_dir, log=lambda msg: err.print(f"[dim]{msg}[/]")))


RouteSuiteOpt = typer.Option(None, "--suite", help="the artifact is a merge of this text suite's zoo (wordnet | "
                             "wordnet20 | wordnet30): its tokenizer and heads are the suite's")


@route_app.command("train")
@guarded
def route_train(
    artifact: Path = typer.Argument(..., help="flex-model directory (Hugging Face inputs, or a text suite's merge)"),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="JSON lines {\"text\": ..., "
                                               "\"task\": ...}, a few hundred per task (e.g. a validation split)"),
    suite: Optional[str] = typer.Option(None, "--suite", help="instead of --calibration: the artifact is a merge of "
                                        "this text suite's zoo (wordnet | wordnet20 | wordnet30); the router "
                                        "learns from the suite's validation split"),
    per_task: Optional[int] = typer.Option(None, "--per-task", min=1, help="with --suite: examples per task, "
                                           "evenly spread over each task's split [default: all]"),
    cache_dir: Optional[Path] = CacheOpt,
    epochs: int = typer.Option(50, "--epochs", min=1, help="training epochs (Twin-Merging's 50)"),
    seed: int = typer.Option(0, "--seed", help="seed of the router's initialization, shuffling and dropout"),
    batch_size: int = typer.Option(1024, "--batch-size", min=2, help="examples per step (Twin-Merging's 1024)"),
) -> None:
    """Train the router on the shared model's pooled features and store it in the artifact.

    Example: flexmerge route train flex-twin --calibration val.jsonl

             flexmerge route train ~/.cache/flexmerge/served/wordnet-...-twin_rank=7-1.3x --suite wordnet
             --batch-size 64
    """
    from flexmerge.flexmodel.artifact import attach_router
    from flexmerge.serve import Runtime

    if (calibration is None) == (suite is None):
        raise FlexMergeError("give exactly one of --calibration FILE (JSON lines of text and task) or "
                             "--suite NAME (its validation split)")
    if suite is None and (per_task is not None or cache_dir is not None):
        raise FlexMergeError("--per-task and --cache-dir go with --suite")
    if suite is not None:
        the_suite, options = _suite_runtime(artifact, suite, cache_dir)
        pairs = the_suite.router_calibration(per_task)
    else:
        pairs, options = _calibration(calibration), {}
    runtime = Runtime.load(artifact, **options)
    router = runtime.train_router(pairs, epochs=epochs, seed=seed, batch_size=batch_size)
    routed = runtime.route([t for t, _ in pairs]).argmax(-1).tolist()
    hits = sum(r == runtime.tasks.index(k) for r, (_, k) in zip(routed, pairs))
    attach_router(artifact, router)
    console.print(f"router {router.shape} trained on {len(pairs)} examples; calibration routing accuracy "
                  f"{hits / len(pairs):.3f}; stored in {escape(str(artifact))}", soft_wrap=True)


@route_app.command("predict")
@guarded
def route_predict(
    artifact: Path = typer.Argument(..., help="flex-model directory with a router"),
    text: list[str] = typer.Option(..., "--text", help="an input (repeatable)"),
    mode: str = typer.Option("argmax", "--mode", help="argmax (one mixed pass) | mixture (weights mixed per input)"),
    suite: Optional[str] = RouteSuiteOpt,
    cache_dir: Optional[Path] = CacheOpt,
) -> None:
    """Answer inputs without task ids: route, then run the routed weights. Prints JSON lines.

    Example: flexmerge route predict flex-twin --text "a small dog" --mode mixture
    """
    from flexmerge.serve import Runtime

    if suite is None and cache_dir is not None:
        raise FlexMergeError("--cache-dir goes with --suite")
    options = _suite_runtime(artifact, suite, cache_dir)[1] if suite is not None else {}
    for answer in Runtime.load(artifact, **options).predict_routed(text, mode=mode):
        console.print(json.dumps(answer), soft_wrap=True, markup=False)


@command
def pleas(
    model: list[str] = typer.Option(..., "--model", help="one of the two models as NAME=PATH (give it twice): a checkpoint "
                                                             "(a residual MLP as the digits suite's, or a GroupNorm "
                                                             "CNN as the fashion suite's), or a BERT-style HF model "
                                                             "directory"),
    size: float = typer.Option(..., "--size", help="size in [1, 2]: 1 = one merged model, 2 = both side by side"),
    calibration: Optional[str] = typer.Option(None, "--calibration",
                                              help="calibration inputs: a safetensors file (one (N, in) tensor, or "
                                                   "'inputs'; for BERT: input_ids [+ attention_mask], or a .txt file, "
                                                   "one input a line) or a suite name "
                                                   "(digits, fashion: its validation inputs); omitted: weight "
                                                   "matching, no least squares"),
    out: Path = typer.Option(..., "--out", help="output directory (weights, heads, config.json, modeling_pleas.py; "
                                                "BERT: a plain HF checkpoint + pleas.json)"),
    head: Optional[list[str]] = typer.Option(None, "--head", help="a task's head as NAME=PATH, widened to read "
                                                                  "its slice of the features (repeatable)"),
    schedule: str = typer.Option("greedy", "--schedule", help="per-layer widths: greedy (by matching cost) | uniform"),
    matching: Optional[str] = typer.Option(None, "--matching",
                                           help="activation (correlation + Hungarian; default with --calibration) | "
                                                "weights (Git Re-Basin weight matching; default without) | identity"),
    least_squares: Optional[bool] = typer.Option(None, "--least-squares/--no-least-squares",
                                                 help="refit layers by masked least squares (default: on with "
                                                      "--calibration; off: permutation only)"),
    ridge: float = typer.Option(1e-6, "--ridge", help="ridge, relative to the mean input energy"),
    batch_size: int = typer.Option(256, "--batch-size", help="calibration inputs per forward pass"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing PLeaS output directory"),
) -> None:
    """Merge two models (even from different bases) to a size in [1, 2] by permutations and least squares.

    Example: flexmerge pleas --model a=a.safetensors --model b=b.safetensors --size 1.5
    --calibration digits --head a=head_a.safetensors --head b=head_b.safetensors --out ab-1.5x/

    Fashion CNNs: flexmerge pleas --model rot90=rot90.safetensors --model digits=digits.safetensors --size 1.25
    --calibration fashion --head rot90=h1.safetensors --head digits=h2.safetensors --out cnn/

    BERT-style encoders: flexmerge pleas --model a=bert_a/ --model b=bert_b/ --size 1.3 --calibration texts.txt
    --out ab/
    """
    from flexmerge.pleas import is_bert
    from flexmerge.pleas import pleas as pleas_fn
    from flexmerge.suites.calibration import validation_inputs
    from flexmerge.taskvec import parse_task_specs

    models = parse_task_specs(model)
    heads = parse_task_specs(head) if head else None
    inputs = calibration  # a file, or (not for BERT) a suite name: its inputs, loaded when PLeaS asks for them
    if calibration is not None and not Path(calibration).is_file() and not any(is_bert(m) for m in models.values()):
        inputs = functools.partial(validation_inputs, calibration)
    merged = pleas_fn(models, size, inputs, heads=heads, out=out, overwrite=overwrite, schedule=schedule,
                      matching=matching, least_squares=least_squares, ridge=ridge, batch_size=batch_size)
    cfg = merged.config
    data = f"{cfg['calibration_samples']} calibration inputs" if cfg["calibration_samples"] else "no calibration data"
    console.print(f"wrote {escape(str(out))}: {cfg['matching']} matching ({data}), size {cfg['size']:.3f}x "
                  f"(dense checkpoint {cfg['dense_size']:.3f}x), {escape(cfg['widths'])}, "
                  f"{len(cfg['refitted'])} layers refit by least squares", soft_wrap=True)


def main() -> None:  # pragma: no cover - entry point
    app()
