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
    ranking = (out / "ranking.md").read_text()
    assert "## Ranking at each size" in ranking
    for curve, points in curves_of(records).items():  # the smallest swept size at 0.95, from the records
        reached = [size for size, normalized in points if normalized >= 0.95]
        assert f"| {curve} | {min(reached):.3f}x |" in ranking if reached else f"| {curve} | - |" in ranking


def curves_of(records: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Per curve, (deployed size, mean normalized accuracy over tasks) of each evaluated request."""
    cells: dict[tuple[str, float], list[dict]] = {}
    for r in records:
        if r["accuracy"] is not None:
            cells.setdefault((r["method"] + ("" if r["planner"] == "greedy" else "/" + r["planner"]),
                              r["requested_size"]), []).append(r)
    out: dict[str, list[tuple[float, float]]] = {}
    for (curve, _), rows in cells.items():
        out.setdefault(curve, []).append((rows[0]["size"], sum(r["normalized"] for r in rows) / len(rows)))
    return out


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


# fashion: a tiny config (few examples, 1 epoch, 3 tasks) through the public API --------------
FASHION_TINY = dict(task_subset=["rot90", "inverted_groups", "digits"], pretrain_examples=256, pretrain_epochs=1,
                    sizes=(96, 32, 64), finetune_epochs=1)


def _fashion_or_skip():
    from flexmerge.suites.fashion import FashionSuite

    suite = FashionSuite(**FASHION_TINY)
    reason = suite.unavailable_reason()
    if reason:
        pytest.skip(f"fashion suite unavailable here: {reason}")
    return suite


@pytest.fixture(scope="session")
def fashion_tiny(tmp_path_factory):
    suite = _fashion_or_skip()
    cache = tmp_path_factory.mktemp("fashion-cache")
    return suite, get_zoo(suite, cache, log=lambda s: None), cache


def test_tiny_fashion_zoo_scores_and_sweeps(fashion_tiny, tmp_path):
    from safetensors.torch import load_file

    from flexmerge.suites import run_sweep

    suite, zoo, cache = fashion_tiny
    assert zoo.tasks == FASHION_TINY["task_subset"] and zoo.info["build_seconds"] > 0
    assert zoo.info["test_examples"] == {"rot90": 64, "inverted_groups": 64, "digits": 64}
    evaluate = suite.evaluator(zoo)
    for task in zoo.tasks:  # the evaluator reproduces the accuracy the build measured on the test split
        assert evaluate(task, load_file(zoo.models[task])) == zoo.info["finetuned"][task]
    assert suite.evaluator(zoo, "val")("rot90", load_file(zoo.models["rot90"])) == zoo.info["val_finetuned"]["rot90"]
    tasks = flexmerge.load_tasks(zoo.base, zoo.models, **suite.load_options())
    blocks = flexmerge.discover_blocks(tasks).names()
    assert {"stem", "layers.0.norm", "layers.0.mlp", "layers.4.mlp", "proj", "final_norm"} <= set(blocks)
    result, paths = run_sweep(suite, tmp_path / "out", methods=["task_arithmetic"], sizes=[1, 3], cache_dir=cache,
                              planners=["greedy", "output"], log=lambda s: None)
    assert json.loads(paths["json"].read_text())["meta"]["suite"] == "fashion"
    at_3x = [r for r in result.records if r.requested_size == 3]
    assert {(r.task, r.planner) for r in at_3x} == {(t, p) for t in zoo.tasks for p in ("greedy", "output")}
    assert all(r.accuracy == zoo.info["finetuned"][r.task] for r in at_3x)  # Mx = the fine-tuned models


def test_fashion_task_views_are_what_they_claim():
    from flexmerge.suites.fashion import CLASSES, digits_28, zoom

    suite = _fashion_or_skip()
    data = suite.data()
    src, idx = data["sources"], data["indices"]
    x, y = data["tasks"]["rot90"]["train"]
    originals = src["fashion"]["train"][0][idx["rot90"]["train"]].float() / 255  # stored as bytes
    assert x.shape == (96, 1, 28, 28) and torch.equal(x[:, 0], torch.rot90(originals, 1, (1, 2)))
    assert torch.equal(y, src["fashion"]["train"][1][idx["rot90"]["train"]])  # all 10 classes, as labelled
    x, y = data["tasks"]["inverted_groups"]["test"]
    raw_y = src["fashion"]["test"][1][idx["inverted_groups"]["test"]]
    assert torch.equal(x[:, 0], 1 - src["fashion"]["test"][0][idx["inverted_groups"]["test"]].float() / 255)
    shoes = [CLASSES.index(c) for c in ("sandal", "sneaker", "ankle boot")]
    assert torch.equal(y == 2, torch.isin(raw_y, torch.tensor(shoes)))  # group 2: footwear
    x, y = data["tasks"]["digits"]["test"]
    from sklearn.datasets import load_digits

    raw = load_digits()
    picked = idx["digits"]["test"]
    assert torch.equal(y, torch.tensor(raw.target)[picked])
    assert torch.allclose(x[:, 0], digits_28(torch.tensor(raw.images, dtype=torch.float32)[picked]))
    assert torch.equal(x[:, 0, :4], torch.zeros(len(x), 4, 28))  # a 4-pixel margin, as MNIST has
    img = torch.zeros(1, 28, 28)
    img[0, 6:22, 6:22] = torch.linspace(0, 1, 16 * 16).reshape(16, 16)
    zoomed = zoom(img)  # the central 16x16 crop, rescaled to 28x28: its corners are the crop's corners
    assert zoomed.shape == (1, 28, 28) and zoomed[0, 0, 0] < 0.02 and zoomed[0, -1, -1] > 0.98
    # no example of a task's test split is trained on; the tasks' fashion images are not the base's
    pre = set(data["pretrain_indices"].tolist())
    for task, cut in idx.items():
        train, val, test = (set(cut[s].tolist()) for s in ("train", "val", "test"))
        assert not train & val
        if task.startswith("digits"):  # one pool of 1797 digits, split three ways
            assert not (train | val) & test
        else:  # train/val from the tasks' half of Fashion-MNIST's train set, test from its test set
            assert not pre & (train | val)


def test_fashion_reader_rejects_missing_and_damaged_files(tmp_path, monkeypatch):
    import gzip
    import struct

    from flexmerge.errors import FlexMergeError
    from flexmerge.suites import fashion

    good = tmp_path / "labels.gz"
    good.write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + struct.pack(">I", 3) + bytes([7, 0, 9])))
    assert fashion.read_idx(good, 1).tolist() == [7, 0, 9]
    with pytest.raises(FlexMergeError, match="is missing .*apt-get install dataset-fashion-mnist"):
        fashion.read_idx(tmp_path / "nope.gz", 1)
    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + bytes([7, 0])))
    with pytest.raises(FlexMergeError, match="holds 2 bytes of data, its header says 5"):
        fashion.read_idx(truncated, 1)
    with pytest.raises(FlexMergeError, match="not an idx file of 3-D"):
        fashion.read_idx(good, 3)
    not_gzip = tmp_path / "plain.gz"
    not_gzip.write_bytes(b"\x00\x00\x08\x01 not compressed")
    with pytest.raises(FlexMergeError, match="not a readable gzip file"):
        fashion.read_idx(not_gzip, 1)
    cut_gzip = tmp_path / "cut.gz"
    cut_gzip.write_bytes(good.read_bytes()[:-6])
    with pytest.raises(FlexMergeError, match="not a readable gzip file"):
        fashion.read_idx(cut_gzip, 1)
    monkeypatch.setattr(fashion, "FASHION_DIR", tmp_path)
    reason = fashion.FashionSuite().unavailable_reason()
    assert "Fashion-MNIST not found" in reason and "apt-get install dataset-fashion-mnist" in reason
    with pytest.raises(FlexMergeError, match="cannot run here: Fashion-MNIST not found"):
        get_zoo(fashion.FashionSuite(), tmp_path / "cache")
