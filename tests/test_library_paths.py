"""Library paths the redesign put below the CLI: the one-read merge (`merge_files`), the inspect
summary, PlanOptions and the planner registry."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import flexmerge
from flexmerge.cli import app
from flexmerge.errors import ConfigError
from flexmerge.io.source import SafetensorsSource
from flexmerge.planning import PLANNERS, PlanOptions, register_planner
from flexmerge.planning.registry import PlanInputs
from tests.test_golden_artifacts import digests


@pytest.fixture
def count_reads(monkeypatch):
    """Counts the tensor reads from safetensors inputs (whole tensors and row ranges)."""
    counts = {"reads": 0}
    for name in ("read", "read_rows"):
        original = getattr(SafetensorsSource, name)

        def counted(self, *args, _original=original):
            counts["reads"] += 1
            return _original(self, *args)

        monkeypatch.setattr(SafetensorsSource, name, counted)
    return counts


@pytest.mark.parametrize("method,size,fewer", [("task_arithmetic", 1, True), ("task_arithmetic", 2, True),
                                               ("ties:keep=0.3", 2, False)])
def test_merge_files_writes_what_load_and_merge_write_with_fewer_reads(zoo, tmp_path, count_reads, method, size,
                                                                       fewer):
    """A 1x TA merges in the validation pass; a 2x TA plans on the pass's Gram matrices. (A TIES trim's
    histogram saves a pass over large tensors only: these fit in one chunk, selected directly.)"""
    base, models = zoo
    flexmerge.merge_to_disk(flexmerge.load_tasks(base, models), tmp_path / "two-steps", size=size, method=method)
    two_steps, count_reads["reads"] = count_reads["reads"], 0
    flexmerge.merge_files(base, models, tmp_path / "one-read", size=size, method=method)
    assert digests(tmp_path / "one-read") == digests(tmp_path / "two-steps")
    assert (count_reads["reads"] < two_steps) == fewer


def test_the_cli_merge_is_merge_files(zoo, tmp_path):
    base, models = zoo
    args = ["merge", "--base", str(base), *(f"--model={t}={p}" for t, p in models.items()), "--method", "ties",
            "--size", "2", "--planner", "recon", "--out", str(tmp_path / "cli")]
    assert CliRunner().invoke(app, args).exit_code == 0
    flexmerge.merge_files(base, models, tmp_path / "api", size=2.0, method="ties", planner="recon")  # as --size reads
    assert digests(tmp_path / "cli") == digests(tmp_path / "api")


def test_artifact_summary_is_what_inspect_prints(zoo, tmp_path):
    base, models = zoo
    flexmerge.merge_files(base, models, tmp_path / "art", size=2, method="ties")
    summary = flexmerge.artifact_summary(tmp_path / "art")
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "art"), "--json"])
    assert r.exit_code == 0 and json.loads(r.output) == summary
    assert summary["tasks"] == list(models) and summary["method"]["name"] == "ties"
    assert {t for b in summary["blocks"] for g in b["groups"] for t in g} == set(models)


def test_plan_options_hold_the_defaults_and_refuse_unknown_fields():
    assert PlanOptions.of() == PlanOptions()
    assert PlanOptions.of(PlanOptions(seed=3), linkage="avg", mode=None) == PlanOptions(linkage="avg", seed=3)
    with pytest.raises(ConfigError, match="unknown plan option\\(s\\) linkge; known: cost, linkage"):
        PlanOptions.of(linkge="avg")


def test_a_registered_planner_plans_through_the_api(tasks, monkeypatch):
    """A planner is one registered function: here, every block's pairs fused in task order."""
    monkeypatch.setattr("flexmerge.planning.registry.PLANNERS", dict(PLANNERS))
    from flexmerge.planning.planners import sized_steps

    @register_planner("in-order", "order", summary="fuse task 0 with 1, then with 2, ... in every block")
    def in_order(inputs: PlanInputs):
        m = inputs.tasks.num_tasks
        raw = [(b, tuple(range(k)), (k,), 0.0) for b in range(len(inputs.partition)) for k in range(1, m)]
        return sized_steps(raw, len(inputs.partition), m, inputs.sizer)

    path = flexmerge.plan(tasks, planner="in-order")
    assert path.planner == "in-order" and path.steps[0].left == (0,) and path.steps[0].right == (1,)
    assert path.min_size == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="unknown planner 'nope'; choose one of: .*in-order"):
        flexmerge.plan(tasks, planner="nope")


def test_inspect_of_a_manifest_without_its_version_is_one_line(zoo, tmp_path):
    base, models = zoo
    flexmerge.merge_files(base, models, tmp_path / "art", size=2, method="ties")
    manifest = tmp_path / "art" / "manifest.json"
    data = json.loads(manifest.read_text())
    del data["flexmerge_version"]
    manifest.write_text(json.dumps(data))
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "art")])
    assert r.exit_code == 2 and "internal error" not in r.output
    assert "field 'flexmerge_version' is missing" in " ".join(r.output.split())
