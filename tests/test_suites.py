"""Suites and the sweep: digits end to end (as CI runs it), cache safety, a tiny wordnet zoo."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import flexmerge
from flexmerge.cli import app
from flexmerge.curve import sweep
from flexmerge.suites import get_suite, get_zoo
from flexmerge.suites.base import verify_zoo


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    get_zoo(get_suite("digits"), cache, log=lambda s: None)
    return cache


def test_digits_sweep_end_to_end_through_the_cli(digits_cache, tmp_path):
    out = tmp_path / "results"
    r = CliRunner().invoke(app, ["sweep", "--suite", "digits", "--methods", "task_arithmetic,ties,emr",
                                 "--sizes", "1,2,4,8", "--planners", "greedy,channel,output", "--out", str(out),
                                 "--cache-dir", str(digits_cache)])
    assert r.exit_code == 0, r.output
    assert "mean normalized accuracy" in r.output and "normalized_accuracy.png" in r.output
    assert "area 1-3x" in r.output and "ranking by area 1-3x" in r.output
    for name in ["results.csv", "results.json", "ranking.md", "areas.csv", "normalized_accuracy.png",
                 "absolute_accuracy.png"]:
        assert (out / name).is_file(), name
    assert (out / "normalized_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "results.json").read_text())
    records = data["records"]
    assert {r["method"] for r in records} == {"task_arithmetic", "ties", "emr"}
    assert {r["planner"] for r in records} == {"greedy", "channel", "output"}
    assert set(data["areas"]["normalized"]) == {f"{m}{p}" for m in ("task_arithmetic", "ties", "emr")
                                                for p in ("", "/channel", "/output")}
    zoo = get_zoo(get_suite("digits"), digits_cache)
    for rec in records:
        if rec["requested_size"] == 8:  # Mx: exactly the fine-tuned model, so exactly its accuracy
            assert rec["accuracy"] == rec["finetuned"] == zoo.info["finetuned"][rec["task"]]
            assert rec["normalized"] == 1.0
    assert data["areas"]["normalized"]["emr"] is None  # emr cannot reach 1x: its area is undefined
    emr_1x = [r for r in records if r["method"] == "emr" and r["requested_size"] == 1]
    assert all(r["accuracy"] is None and "below the minimum size" in r["note"] for r in emr_1x)
    curves = data["curves"]["task_arithmetic"]
    assert curves[0]["normalized"] < 0.95  # merging 8 tasks into one costs accuracy: a trade-off
    assert "## Ranking at each size" in (out / "ranking.md").read_text()


def test_digits_accuracy_is_on_the_test_split_only(digits_cache):
    from safetensors.torch import load_file

    from flexmerge.suites.digits import TASKS, DigitsNet

    suite = get_suite("digits")
    zoo = get_zoo(suite, digits_cache)
    data = suite.data()
    idx = data["indices"]
    assert not set(idx["train"].tolist()) & set(idx["test"].tolist())
    assert not set(idx["val"].tolist()) & set(idx["test"].tolist())
    assert not set(idx["pretrain"].tolist()) & set(idx["test"].tolist())
    evaluate = suite.evaluator(zoo)
    task = TASKS[2]
    sd = load_file(zoo.models[task.name])
    net, head = DigitsNet().eval(), torch.nn.Linear(64, task.classes)
    net.load_state_dict(sd)
    head.load_state_dict(load_file(zoo.head(task.name)))
    xs, ys = data["tasks"][task.name]["test"]
    with torch.no_grad():
        expected = int((head(net(xs)).argmax(1) == ys).sum()) / len(ys)
    assert evaluate(task.name, sd) == expected
    assert len(ys) > 300


def test_zoo_cache_is_reused_verified_and_rebuilt_when_damaged(tmp_path):
    suite = get_suite("digits")
    suite.pretrain_epochs, suite.finetune_epochs = 2, 1  # a different config: its own, fast cache entry
    logs: list[str] = []
    zoo = get_zoo(suite, tmp_path, log=logs.append)
    assert any("building" in m for m in logs) and verify_zoo(zoo.directory) is None
    logs.clear()
    again = get_zoo(suite, tmp_path, log=logs.append)
    assert again.directory == zoo.directory and logs == []
    model = zoo.models["rot90"]
    model.write_bytes(model.read_bytes()[:-7])
    assert "fails its checksum" in verify_zoo(zoo.directory)
    get_zoo(suite, tmp_path, log=logs.append)
    assert any("unusable" in m for m in logs) and verify_zoo(zoo.directory) is None
    (zoo.directory / "zoo.json").unlink()  # as if a build had died before finishing
    logs.clear()
    get_zoo(suite, tmp_path, log=logs.append)
    assert any("no zoo.json" in m for m in logs)
    assert [p.name for p in tmp_path.iterdir()] == [zoo.directory.name]  # no partial directories left


def test_python_sweep_with_a_user_evaluator(tasks):
    """Any callable (task, state_dict) -> accuracy works; here: closeness to the fine-tuned weights."""

    refs = {t: tasks.finetuned_state_dict(i) for i, t in enumerate(tasks.names)}

    def closeness(task, sd):
        err = sum(float((sd[k].float() - refs[task][k].float()).norm()) for k in tasks.mergeable)
        return 1.0 / (1.0 + err)

    result = sweep(tasks, closeness, methods=["task_arithmetic", "consensus"], sizes=[1, 2.5, 4],
                   planners=["greedy", "cluster", "right-left"])
    curves = result.curves()
    assert set(curves) == {"task_arithmetic", "consensus", "task_arithmetic/cluster", "consensus/cluster",
                           "task_arithmetic/right-left", "consensus/right-left"}
    for points in curves.values():
        assert points[-1]["normalized"] == 1.0  # at 4x = Mx
        values = [p["normalized"] for p in points]
        assert values == sorted(values)  # more size, closer to the fine-tuned weights


def test_demo_help_and_unknown_suite():
    r = CliRunner().invoke(app, ["demo", "--help"])
    assert r.exit_code == 0 and "--suite" in r.output
    r = CliRunner().invoke(app, ["sweep", "--suite", "imagenet"])
    assert r.exit_code == 2 and "unknown suite 'imagenet'" in r.output
    r = CliRunner().invoke(app, ["sweep", "--suite", "digits", "--methods", "tiez"])
    assert r.exit_code == 2 and "unknown merging method 'tiez'" in r.output


def test_tiny_wordnet_zoo(tmp_path):
    suite = get_suite("wordnet")
    reason = suite.unavailable_reason()
    if reason:
        pytest.skip(f"wordnet suite unavailable here: {reason}")
    from flexmerge.suites.wordnet import WordNetSuite

    tiny = WordNetSuite(task_subset=["living", "part_of_speech"], per_class=(16, 4, 10), max_steps=3)
    zoo = get_zoo(tiny, tmp_path, log=lambda s: None)
    assert zoo.info["steps"] == {"living": 3, "part_of_speech": 3}
    assert zoo.info["test_examples"] == {"living": 50, "part_of_speech": 40}
    tasks = flexmerge.load_tasks(zoo.base, zoo.models)
    assert any(k.startswith("embeddings.") for k in tasks.frozen)  # frozen embeddings are stored once
    result = sweep(tasks, tiny.evaluator(zoo), methods=["task_arithmetic"], sizes=[1, 2])
    at_2x = [r for r in result.records if r.requested_size == 2]
    assert all(r.accuracy == zoo.info["finetuned"][r.task] for r in at_2x)
