"""Merging what a config file describes: one merge, or mergekit-multi's stages.

A file of several YAML documents is mergekit-multi's: each document a mergekit config with a
`name:`, a later stage naming an earlier one as a model. The stages run in dependency order
(`flexmerge.mergekit.stage_order`). Every stage but the last is merged at 1x, one model as
mergekit makes it, and exported (its first task's Hugging Face directory) to OUT.stages/NAME,
where later stages read it; the last stage (the unnamed one, else the last in order) is merged
at the asked size into OUT.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flexmerge._atomic import OutputExistsError, check_target
from flexmerge.api import merge_files
from flexmerge.config import MergeConfig, config_of, read_documents
from flexmerge.errors import ConfigError
from flexmerge.executors import get_executor
from flexmerge.flexmodel import export, load
from flexmerge.flexmodel.export import is_export_dir
from flexmerge.flexmodel.read import is_artifact
from flexmerge.mergekit import stage_order

# command-line fields that hold for every stage (how to read, where to compute); the others (size,
# method, models, ...) are the last stage's
EVERY_STAGE = ("executor", "ray_address", "device", "input_hash", "allow_mixed_dtypes", "max_relative_change")


def merge_from_config(cfg: MergeConfig, out: Path, *, overwrite: bool = False, resume: bool = True) -> dict[str, Any]:
    """The merge `cfg` describes, written to the artifact `out`; returns its manifest."""
    return merge_files(cfg.base, cfg.models, out, size=cfg.size, max_bytes=cfg.max_bytes, method=cfg.method,
                       params=cfg.params, overwrite=overwrite, executor=get_executor(cfg.executor,
                                                                                     address=cfg.ray_address),
                       load_options=cfg.load_options(), options=cfg.plan_options(), resume=resume,
                       device=cfg.device, **cfg.partition_options(), **cfg.side_file_options())


def is_multi_stage(file: Path | None) -> bool:
    """Whether a config file holds several YAML documents (one that cannot be read is not: the
    single-document path reports what is wrong with it)."""
    if file is None or not file.is_file():
        return False
    try:
        return len(read_documents(file)) > 1
    except ConfigError:  # build_config reports it
        return False


def stages_dir(out: Path) -> Path:
    """Where the stages before the last are written."""
    return out.with_name(out.name + ".stages")


def merge_stages(file: Path, overrides: Mapping[str, Any], out: Path, *, overwrite: bool = False,
                 resume: bool = True, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Run the stages of `file` in order (see the module); `overrides` are the command line's
    fields (the last stage takes them all, the others `EVERY_STAGE`). Returns the last stage's
    manifest."""
    stages = stage_order(read_documents(file), str(file))
    check_target(out, overwrite, is_artifact, "a flex-model artifact")  # before the first stage, not after
    outputs: dict[str, Path] = {}
    for stage in stages[:-1]:
        fields = {k: v for k, v in overrides.items() if k in EVERY_STAGE}
        cfg = config_of(stage.doc, file, {**fields, "size": 1.0, "max_bytes": None}, stages=outputs)
        target = stages_dir(out) / str(stage.name)
        if target.exists() and not is_export_dir(target):
            raise OutputExistsError(f"{target} exists and is not a flexmerge export; refusing to replace it: "
                                    "remove it yourself or choose another output")
        artifact = stages_dir(out) / f".{stage.name}.artifact"
        artifact.parent.mkdir(parents=True, exist_ok=True)
        merge_from_config(cfg, artifact, overwrite=True, resume=False)
        flex = load(artifact)
        export(flex, flex.tasks[0], target, overwrite=True)
        shutil.rmtree(artifact)
        outputs[str(stage.name)] = target
        log(f"stage {stage.name}: {len(cfg.models)} models, method {cfg.method}, 1x -> {target}")
    cfg = config_of(stages[-1].doc, file, dict(overrides), stages=outputs)
    if cfg.size is None and cfg.max_bytes is None:
        raise ConfigError("--size or --max-bytes (or `size:` / `max_bytes:` in the last stage) is required")
    return merge_from_config(cfg, out, overwrite=overwrite, resume=resume)
