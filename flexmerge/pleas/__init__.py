"""PLeaS: merge two models (even from different bases) to a size in [1, 2] by permutations and least squares.

A sibling pipeline of the task-vector planner: its input is two models and calibration activations.
See docs/pleas.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from flexmerge.errors import CheckpointError, ConfigError
from flexmerge.io.open import open_checkpoint
from flexmerge.pleas.bert import is_bert, pleas_bert
from flexmerge.pleas.common import PleasModel, is_pleas_dir, save_pleas
from flexmerge.pleas.lstsq import DEFAULT_RIDGE
from flexmerge.pleas.merge import pleas_merge
from flexmerge.pleas.schedule import SCHEDULES
from flexmerge.pleas.spec import SPECS, PermSpec, spec_for

Model = str | Path | Mapping[str, torch.Tensor]
# what `pleas` calls, with the merged models' names, for inputs it was not given (e.g. a suite's)
CalibrationLoader = Callable[[Sequence[str]], torch.Tensor | Mapping[str, torch.Tensor]]
Calibration = torch.Tensor | str | Path | CalibrationLoader


def read_state(model: Model) -> dict[str, torch.Tensor]:
    """A checkpoint (any format flexmerge reads) or a state dict, as a dict of tensors."""
    if isinstance(model, Mapping):
        return {k: v.detach() for k, v in model.items()}
    source = open_checkpoint(model)
    return {k: source.read(k) for k in source.keys()}


def calibration_inputs(calibration: Calibration, tasks: Sequence[str] = ()) -> torch.Tensor:
    """Calibration inputs: a tensor, a safetensors file holding one tensor (or `inputs`), or a loader
    called with `tasks` (the merged models' names, so that it can pick their inputs). Data by name
    (a suite's) is the caller's to look up: the library knows no suites."""
    if isinstance(calibration, torch.Tensor):
        return calibration
    if callable(calibration):
        return calibration(list(tasks))
    path = Path(calibration)
    if not path.is_file():
        raise ConfigError(f"calibration {str(calibration)!r} is not a file; give a tensor, a safetensors file or "
                          "a loader of inputs")
    return read_calibration_file(path)


def read_calibration_file(path: Path) -> torch.Tensor:
    """The one tensor a safetensors file holds, or the one named `inputs`."""
    tensors = read_tensors(path)
    if len(tensors) != 1 and "inputs" not in tensors:
        raise ConfigError(f"calibration file {path} holds {len(tensors)} tensors ({', '.join(sorted(tensors)[:5])}); "
                          "store one, or name the inputs 'inputs'")
    return tensors.get("inputs", next(iter(tensors.values())))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A calibration file's tensors; a CheckpointError naming it when it is no safetensors file."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"calibration file {path} is not a readable safetensors file: {e}") from None


def bert_calibration(calibration: Calibration | Mapping[str, torch.Tensor] | None, tasks: Sequence[str] = ()
                     ) -> Mapping[str, torch.Tensor] | Path | None:
    """BERT calibration: None, a dict of token tensors, a safetensors file of them, a loader of them (called
    with `tasks`), or a .txt file (kept as a path: it is tokenized by model a's tokenizer)."""
    if calibration is None or isinstance(calibration, Mapping):
        return calibration
    if callable(calibration):
        return calibration(list(tasks))
    path = Path(calibration)
    if not path.is_file():
        raise ConfigError(f"BERT calibration {str(calibration)!r} is not a file (safetensors with input_ids, or text)")
    if path.suffix == ".txt":
        return path
    if path.suffix != ".safetensors":
        raise ConfigError(f"BERT calibration {path.name!r}: give a .safetensors file (input_ids [+ attention_mask]) "
                          "or a .txt file (one input a line)")
    return read_tensors(path)


def pleas(models: Mapping[str, Model], size: float, calibration: Calibration | None = None, *,
          heads: Mapping[str, Model] | None = None, out: str | Path | None = None, overwrite: bool = False,
          schedule: str = "greedy", matching: str | None = None, least_squares: bool | None = None,
          ridge: float = DEFAULT_RIDGE, batch_size: int = 256) -> PleasModel:
    """Merge two models (name -> checkpoint or state dict) to `size` in [1, 2]; write to `out` if given.

    With calibration inputs the defaults are activation matching + least squares; without them,
    weight matching and no refit (the refit needs inputs; another domain's inputs will do).
    Example: flexmerge.pleas({"a": "a.safetensors", "b": "b.safetensors"}, 1.5, "calibration.safetensors",
    out="ab-1.5x"); a suite's validation inputs: flexmerge.suites.calibration.suite_inputs("digits", ["a", "b"]).
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown PLeaS schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1; got {batch_size}")
    has_data = calibration is not None
    matching = matching or ("activation" if has_data else "weights")
    least_squares = has_data if least_squares is None else least_squares
    if any(is_bert(m) for m in models.values()):
        if heads:
            raise ConfigError("BERT-style encoders keep their task heads unchanged (the residual stream is shared, "
                              "so every head reads it as before); give no heads")
        merged = pleas_bert(models, size, bert_calibration(calibration, list(models)), schedule_name=schedule,
                            matching=matching, least_squares=least_squares, ridge=ridge, batch_size=min(batch_size, 64))
        if out is not None:
            save_pleas(merged, out, overwrite=overwrite)
        return merged
    states = {name: read_state(m) for name, m in models.items()}
    head_states = {name: read_state(h) for name, h in (heads or {}).items()}
    x = calibration_inputs(calibration, list(models)) if has_data else None
    merged = pleas_merge(states, x, size, heads=head_states, schedule_name=schedule, matching=matching,
                         least_squares=least_squares, ridge=ridge, batch_size=batch_size)
    if out is not None:
        save_pleas(merged, out, overwrite=overwrite)
    return merged


__all__ = ["pleas", "pleas_merge", "save_pleas", "is_pleas_dir", "is_bert", "PleasModel", "PermSpec", "spec_for",
           "SPECS", "SCHEDULES", "Calibration", "CalibrationLoader", "calibration_inputs"]
