"""What both PLeaS pipelines share: the merged model's type, the [merged | a | b] layout, checks.

`merge.py` (residual MLPs, GroupNorm CNNs) and `bert.py` (BERT-style encoders) both import this
module and nothing of each other; the choice between them is made once, in `flexmerge.pleas.pleas`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flexmerge._atomic import atomic_directory
from flexmerge.errors import CheckpointError, ConfigError
from flexmerge.pleas import modeling
from flexmerge.pleas.matching import Split

State = dict[str, torch.Tensor]
MATCHINGS = ("activation", "weights", "identity")
PLEAS_INFO = "pleas.json"  # a BERT output's PLeaS facts (its config.json is the HF model's)
# the file that names an output's architecture -> the architectures written with it (what --overwrite may replace)
OUTPUT_MARKERS = {modeling.CONFIG: ("pleas-residual-mlp", "pleas-fashion-cnn"), PLEAS_INFO: ("pleas-bert",)}


@dataclass
class PleasModel(ABC):
    """The merged encoder, one widened head per task, and what was decided on the way. Each pipeline
    subclasses it with how its encoder is built and written, so callers need not know which made it."""

    config: dict
    state: State
    heads: dict[str, State] = field(default_factory=dict)

    @abstractmethod
    def build(self) -> torch.nn.Module:
        """The merged encoder's (untrained) module, shaped by `config`."""

    @abstractmethod
    def write(self, directory: Path) -> None:
        """The output files, into the (new, empty) `directory`."""

    def module(self) -> torch.nn.Module:
        """The merged encoder with its weights, in eval mode."""
        model = self.build()
        model.load_state_dict(self.state)
        return model.eval()

    def head(self, task: str) -> torch.nn.Linear:
        w = self.heads[task]["weight"]
        head = torch.nn.Linear(w.shape[1], w.shape[0])
        head.load_state_dict(self.heads[task])
        return head.eval()


def save_pleas(model: PleasModel, out: str | Path, overwrite: bool = False) -> Path:
    """Write the merged model into `out` atomically (see `PleasModel.write` of its pipeline)."""
    out = Path(out)
    with atomic_directory(out, overwrite=overwrite, replaceable=is_pleas_dir, what="a PLeaS model") as tmp:
        model.write(tmp)
    return out


def is_pleas_dir(path: Path) -> bool:
    """A directory `save_pleas` wrote (what --overwrite may replace)."""
    for name, archs in OUTPUT_MARKERS.items():
        try:
            cfg = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        if path.is_dir() and isinstance(cfg, dict) and cfg.get("architecture") in archs:
            return True
    return False


# ---- the [merged | a private | b private] layout ----------------------------------------------------

def layout(ta: torch.Tensor, tb: torch.Tensor, dim: int, s: Split) -> torch.Tensor:
    """[mean of merged | a private | b private] along `dim`, from a's tensor `ta` and b's `tb`."""
    m = s.merged
    ta, tb = ta.index_select(dim, s.a_order), tb.index_select(dim, s.b_order)
    return torch.cat([(ta.narrow(dim, 0, m) + tb.narrow(dim, 0, m)) / 2,
                      ta.narrow(dim, m, s.private), tb.narrow(dim, m, s.private)], dim)


def widen_matrix(wa: torch.Tensor, wb: torch.Tensor, so: Split, si: Split) -> torch.Tensor:
    """A weight widened on its output (0) and input (1) axes; any further axes (kernel, positions) follow."""
    wa, wb = wa[so.a_order][:, si.a_order], wb[so.b_order][:, si.b_order]
    mo, po, mi, pi = so.merged, so.private, si.merged, si.private
    w = torch.zeros(so.width, si.width, *wa.shape[2:], dtype=wa.dtype)
    w[:mo, :mi] = (wa[:mo, :mi] + wb[:mo, :mi]) / 2
    w[:mo, mi:mi + pi], w[:mo, mi + pi:] = wa[:mo, mi:] / 2, wb[:mo, mi:] / 2
    w[mo:mo + po, :mi], w[mo:mo + po, mi:mi + pi] = wa[mo:, :mi], wa[mo:, mi:]
    w[mo + po:, :mi], w[mo + po:, mi + pi:] = wb[mo:, :mi], wb[mo:, mi:]
    return w


def allowed_inputs(so: Split, si: Split | None, n_in: int) -> torch.Tensor:
    """(out, in) mask: a's private outputs never read b's private inputs, nor b's read a's. With n_in a
    multiple of si's width, each input unit spans n_in / width consecutive inputs (a conv's kernel
    positions, a pooled map's positions)."""
    if si is None:
        return torch.ones(so.width, n_in, dtype=torch.bool)
    mask = torch.ones(so.width, si.width, dtype=torch.bool)
    mo, po, mi, pi = so.merged, so.private, si.merged, si.private
    mask[mo:mo + po, mi + pi:] = False
    mask[mo + po:, mi:mi + pi] = False
    return mask.repeat_interleave(n_in // si.width, 1) if n_in > si.width else mask


@contextmanager
def recording(model: torch.nn.Module, names: set[str]) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Each named module's (input, output) of the last forward pass."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o))) for n in names]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


# ---- checks -------------------------------------------------------------------------------------------

def check_pair(sa: State, sb: State, names: tuple[str, str]) -> None:
    """Both models have the same parameters of the same shapes (PLeaS merges one architecture)."""
    if set(sa) != set(sb):
        diff = sorted(set(sa) ^ set(sb))
        raise CheckpointError(f"models {names[0]!r} and {names[1]!r} have different parameters "
                              f"(e.g. {', '.join(diff[:4])}); PLeaS merges two models of one architecture")
    for k in sa:
        if sa[k].shape != sb[k].shape:
            raise CheckpointError(f"{k!r} is {tuple(sa[k].shape)} in {names[0]!r} but {tuple(sb[k].shape)} in "
                                  f"{names[1]!r}; PLeaS merges two models of one architecture")


def check_matching(matching: str, has_data: bool, least_squares: bool) -> None:
    """A known matching, and no step that needs calibration inputs without them."""
    if matching not in MATCHINGS:
        raise ConfigError(f"unknown PLeaS matching {matching!r}; choose one of: {', '.join(MATCHINGS)}")
    if not has_data and matching == "activation":
        raise ConfigError("activation matching needs calibration inputs; give them, or use matching='weights'")
    if not has_data and least_squares:
        raise ConfigError("the least-squares refit needs calibration inputs (inputs from another domain will do); "
                          "without them use least_squares=False (--no-least-squares)")


def check_two(names: Mapping[str, object]) -> None:
    """PLeaS merges a pair."""
    if len(names) != 2:
        raise ConfigError(f"PLeaS merges exactly two models; got {len(names)} ({', '.join(names) or 'none'})")
