"""Commands of the accuracy-size curves: sweep (a suite or your own models) and demo."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from flexmerge.cli.app import command, console, log_dim
from flexmerge.cli.options import (
    BaseOpt,
    CacheOpt,
    ConfigOpt,
    GranOpt,
    ModelOpt,
    RebuildOpt,
    SpecificOpt,
    floats,
    merge_config,
    names,
)
from flexmerge.curve import SweepResult
from flexmerge.errors import FlexMergeError
from flexmerge.extras import require_extra
from flexmerge.own_models import check_sweep_names, sweep_own_models
from flexmerge.report import AREA_LABEL, area_ranking, summary_rows
from flexmerge.suites import get_suite, run_sweep
from flexmerge.taskvec import parse_task_specs

DEFAULT_METHODS = "task_arithmetic,ties,emr,consensus"
DEFAULT_SIZES = "1,1.5,2,3,4,8"
SCORE_NAMES = {"exact": "exact match", "loglik": "completion token probability"}
SuiteOpt = typer.Option(None, "--suite", help="benchmark suite: wordnet (default) | wordnet20 | wordnet30 | digits | "
                        "fashion | wordgen | wordgen-lora")


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
                                                  help="own HF models: TASK=FILE, one per task; text classifiers: "
                                                       "JSONL or CSV with text and label; causal LMs: "
                                                       '{"prompt", "completion"} (JSONL or CSV) or {"messages": [...]} '
                                                       "(JSONL; the task's chat template)"),
    eval_limit: int = typer.Option(1000, "--eval-limit", help="with --eval-data: examples per task, at most"),
    eval_batch_size: int = typer.Option(32, "--eval-batch-size", help="with --eval-data: inputs per forward pass"),
    eval_metric: Optional[str] = typer.Option(None, "--eval-metric",
                                              help="with --eval-data on causal LMs: exact (default: exact match of "
                                                   "greedy completions after normalization) | loglik (the "
                                                   "completions' token probability: exp of their mean "
                                                   "log-likelihood per token)"),
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

    flexmerge sweep --base llama/ --model qa=ft-qa/ --model chat=ft-chat/ --eval-data qa=qa.jsonl
    --eval-data chat=chat.jsonl --eval-metric loglik --sizes 1,1.5,2 --out results/

    flexmerge sweep --config merge.yaml --evaluator myproject.evals:score --out results/

    flexmerge sweep --suite wordnet --methods task_arithmetic,twin:rank=2,twin:rank=15 --sizes 1,1.1,1.5 --routed
    """
    own = base is not None or model or config is not None
    if own and suite is not None:
        raise FlexMergeError("give either --suite or your own models (--base/--model or --config), not both")
    if not own and (evaluator or eval_data or eval_metric or task_specific or device):
        raise FlexMergeError("--evaluator, --eval-data, --eval-metric, --task-specific and --device go with your own "
                             "models (--base and --model, or --config)")
    if own and routed:
        raise FlexMergeError("--routed goes with --suite (a text suite's validation split trains the router)")
    if not own:
        _run_suite(suite or "wordnet", out, methods, sizes, planners, granularity or "sublayer", cache_dir, rebuild,
                   routed)
        return
    check_sweep_names(names(methods), names(planners))
    if (evaluator is None) == (not eval_data):
        raise FlexMergeError("own models need exactly one of --evaluator package.module:function or "
                             "--eval-data TASK=FILE (one per task)")
    cfg = merge_config(config, base=base, model=model, granularity=granularity, task_specific=task_specific,
                       device=device)
    result, paths = sweep_own_models(cfg, out, methods=names(methods), sizes=floats(sizes, "--sizes"),
                                     planners=names(planners), evaluator=evaluator,
                                     eval_data=parse_task_specs(eval_data) if eval_data else None,
                                     eval_limit=eval_limit, eval_batch_size=eval_batch_size,
                                     eval_metric=eval_metric, log=log_dim)
    metric = result.meta["evaluator"]["metric"] if eval_data else "score"
    print_sweep(result, paths, "mean normalized score (merged / fine-tuned)", SCORE_NAMES.get(metric, metric))


@command
def demo(
    suite: str = typer.Option("wordnet", "--suite", help="benchmark suite: wordnet | wordnet20 | wordnet30 | digits | "
                              "fashion | wordgen | wordgen-lora"),
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


def _run_suite(suite_name: str, out: Path, methods: str, sizes: str, planners: str, granularity: str,
               cache_dir: Optional[Path], rebuild: bool, routed: bool = False) -> None:
    check_sweep_names(names(methods), names(planners))
    suite = get_suite(suite_name)
    require_extra("suites", f"the {suite_name!r} suite")
    result, paths = run_sweep(suite, out, methods=names(methods), sizes=floats(sizes, "--sizes"),
                              planners=names(planners), granularity=granularity, cache_dir=cache_dir,
                              rebuild=rebuild, routed=routed, log=log_dim)
    print_sweep(result, paths, f"{suite.name}: mean normalized {suite.score_name} (merged / fine-tuned)",
                suite.score_name, suite.base_name)


def print_sweep(result: SweepResult, paths: dict[str, Path], title: str, score: str = "accuracy",
                base_name: str = "base encoder + trained head") -> None:
    """The results table, the ranking by area, the fine-tuned scores (`score`: what they are), the
    base's (`base_name`: what it is), timings and where files went."""
    header, rows = summary_rows(result)
    table = Table(*header, title=title)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"ranking by {AREA_LABEL} (mean normalized accuracy over that span): "
                  + " > ".join(f"{c} {a:.3f}" for c, a in area_ranking(result)), soft_wrap=True)
    ft = sum(result.finetuned.values()) / len(result.finetuned)
    line = f"fine-tuned mean {score} {ft:.3f} (" + ", ".join(f"{t} {v:.3f}" for t, v in result.finetuned.items()) + ")"
    if result.base:
        line += f"; {base_name} {sum(result.base.values()) / len(result.base):.3f}"
    console.print(line, soft_wrap=True)
    for curve, points in result.curves().items():
        if "router_accuracy" in points[0]:
            console.print(f"{curve}: router accuracy (mean over tasks) " + ", ".join(
                f"{p['router_accuracy']:.3f} at {p['size']:.3f}x" for p in points), soft_wrap=True)
    console.print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items()), soft_wrap=True)
    console.print(f"plots: {paths['normalized_plot']}  {paths['accuracy_plot']}", soft_wrap=True)
    console.print(f"tables: {paths['csv']}  {paths['json']}  {paths['ranking']}  {paths['areas']}", soft_wrap=True)
