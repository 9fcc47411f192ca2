"""The PLeaS command: two models, even from different bases, merged to a size in [1, 2]."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from flexmerge.cli.app import command, console
from flexmerge.pleas import is_bert
from flexmerge.pleas import pleas as pleas_fn
from flexmerge.suites.calibration import validation_inputs
from flexmerge.taskvec import parse_task_specs


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
