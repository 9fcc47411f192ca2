"""PLeaS: merge two models (even from different bases) to a size in [1, 2] by permutations and least squares.

A sibling pipeline of the task-vector planner: its input is two models and calibration activations.
See docs/pleas.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from flexmerge.errors import CheckpointError, ConfigError
from flexmerge.pleas.bert import is_bert, pleas_bert
from flexmerge.pleas.lstsq import DEFAULT_RIDGE
from flexmerge.pleas.merge import PleasModel, pleas_merge, save_pleas
from flexmerge.pleas.schedule import SCHEDULES
from flexmerge.pleas.spec import SPECS, PermSpec, spec_for

Model = str | Path | Mapping[str, torch.Tensor]


def read_state(model: Model) -> dict[str, torch.Tensor]:
    """A checkpoint (any format flexmerge reads) or a state dict, as a dict of tensors."""
    if isinstance(model, Mapping):
        return {k: v.detach() for k, v in model.items()}
    from flexmerge.io.open import open_checkpoint

    source = open_checkpoint(model)
    return {k: source.read(k) for k in source.keys()}


def calibration_inputs(calibration: torch.Tensor | str | Path, tasks: list[str] | None = None) -> torch.Tensor:
    """Calibration inputs: a tensor, a safetensors file holding one tensor (or `inputs`), or a suite name
    (the validation inputs of the suite's tasks named like the merged models, else of all its tasks)."""
    if isinstance(calibration, torch.Tensor):
        return calibration
    path = Path(calibration)
    if path.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"calibration file {path} is not a readable safetensors file: {e}") from None
        if len(tensors) != 1 and "inputs" not in tensors:
            raise ConfigError(f"calibration file {path} holds {len(tensors)} tensors ({', '.join(sorted(tensors)[:5])}); "
                              "store one, or name the inputs 'inputs'")
        return tensors.get("inputs", next(iter(tensors.values())))
    from flexmerge.suites import SUITES, get_suite

    if isinstance(calibration, str) and "/" not in calibration and not path.suffix:
        suite = get_suite(calibration)
        data = suite.data() if hasattr(suite, "data") else {}
        split = data.get("tasks") if isinstance(data, dict) else None
        first = next(iter(split.values()), {}) if split else {}
        if not split or not isinstance(first.get("val", (None,))[0], torch.Tensor):
            raise ConfigError(f"suite {calibration!r} has no tensor inputs to calibrate on; give a safetensors file")
        chosen = [t for t in (tasks or []) if t in split] or list(split)
        return torch.cat([split[t]["val"][0] for t in chosen])
    raise ConfigError(f"calibration {str(calibration)!r} is neither a file nor a suite name "
                      f"(suites: {', '.join(sorted(SUITES) or ['digits', 'wordnet'])})")


def bert_calibration(calibration):
    """BERT calibration: None, a dict of token tensors, a safetensors file of them, or a .txt file (kept as a
    path: it is tokenized by model a's tokenizer)."""
    if calibration is None or isinstance(calibration, Mapping):
        return calibration
    path = Path(calibration)
    if not path.is_file():
        raise ConfigError(f"BERT calibration {str(calibration)!r} is not a file (safetensors with input_ids, or text)")
    if path.suffix == ".txt":
        return path
    if path.suffix != ".safetensors":
        raise ConfigError(f"BERT calibration {path.name!r}: give a .safetensors file (input_ids [+ attention_mask]) "
                          "or a .txt file (one input a line)")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"calibration file {path} is not a readable safetensors file: {e}") from None


def pleas(models: Mapping[str, Model], size: float, calibration: torch.Tensor | str | Path | None = None, *,
          heads: Mapping[str, Model] | None = None, out: str | Path | None = None, overwrite: bool = False,
          schedule: str = "greedy", matching: str | None = None, least_squares: bool | None = None,
          ridge: float = DEFAULT_RIDGE, batch_size: int = 256) -> PleasModel:
    """Merge two models (name -> checkpoint or state dict) to `size` in [1, 2]; write to `out` if given.

    With calibration inputs the defaults are activation matching + least squares; without them,
    weight matching and no refit (the refit needs inputs; another domain's inputs will do).
    Example: flexmerge.pleas({"a": "a.safetensors", "b": "b.safetensors"}, 1.5, "digits", out="ab-1.5x")
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
        merged = pleas_bert(models, size, bert_calibration(calibration), schedule_name=schedule, matching=matching,
                            least_squares=least_squares, ridge=ridge, batch_size=min(batch_size, 64))
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


__all__ = ["pleas", "pleas_merge", "save_pleas", "PleasModel", "PermSpec", "spec_for", "SPECS", "SCHEDULES",
           "calibration_inputs"]
