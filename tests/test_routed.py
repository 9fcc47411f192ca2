"""Routing with a suite's own data: `Suite.calibration` / `labelled_texts`, `flexmerge route train --suite`,
and `flexmerge sweep --routed` (twin points evaluated without task ids), on a tiny BERT text suite whose
tasks use disjoint words (so a router can tell them apart) and whose labels are the fine-tuned models'
own answers (so each fine-tune scores 1.0 and a merge scores what it keeps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import flexmerge
from flexmerge.errors import ConfigError
from flexmerge.suites.base import Suite, get_zoo

transformers = pytest.importorskip("transformers")
from typer.testing import CliRunner  # noqa: E402

import flexmerge.suites as suites  # noqa: E402
from flexmerge.cli import app  # noqa: E402
from flexmerge.curve import sweep  # noqa: E402
from flexmerge.runtime import mean_pool  # noqa: E402
from flexmerge.suites.routing import SuiteRouting  # noqa: E402
from tests.test_serve_suite import _config, write_hf_dir  # noqa: E402

TASK_WORDS = {"a": ["cat", "dog", "bird", "mat"], "b": ["red", "blue", "big", "small"],
              "c": ["runs", "fast", "slow", "flew"]}
CLASSES = {"a": 2, "b": 3, "c": 4}
PER_SPLIT = {"val": 40, "test": 24}


def _texts(task: str, split: str) -> list[str]:
    g = torch.Generator().manual_seed(sum(map(ord, task + split)))  # a seed per (task, split)
    words = TASK_WORDS[task]
    return [" ".join(words[i] for i in torch.randint(len(words), (int(torch.randint(2, 6, (1,), generator=g)),),
                                                      generator=g)) for _ in range(PER_SPLIT[split])]


class TinyRoutingSuite(Suite):
    """Three tiny-BERT tasks with external heads (the wordnet layout). `misroute`: the validation
    split names each input's task one off (a→b→c→a), so the router learns to send inputs away."""

    name = "tinyroute"
    description = "tiny BERT, 3 tasks of disjoint words"

    def __init__(self, hf: Path, cache: Path, misroute: bool = False):
        self.hf, self.cache, self.misroute = hf, cache, misroute
        self._labels: dict[tuple[str, str], list[int]] = {}
        self._tokenizer = None

    def task_names(self):
        return list(TASK_WORDS)

    def config(self):
        return {"version": 1}

    def build(self, directory: Path):
        torch.manual_seed(0)
        base = transformers.BertModel(_config()).eval()
        with torch.no_grad():  # std 1 (BERT's init is 0.02): pooled features tell the words apart
            base.embeddings.word_embeddings.weight.normal_(0, 1)
        base = base.state_dict()
        save_file(base, str(directory / "base.safetensors"))
        for i, task in enumerate(TASK_WORDS):
            g = torch.Generator().manual_seed(10 + i)
            ft = {k: v if k.startswith("embeddings.") else v + 0.05 * torch.randn(v.shape, generator=g)
                  for k, v in base.items()}
            save_file(ft, str(directory / "models" / f"{task}.safetensors"))
            torch.manual_seed(20 + i)
            save_file(torch.nn.Linear(32, CLASSES[task]).state_dict(), str(directory / "heads" / f"{task}.safetensors"))
        return {}

    def _model_and_heads(self, zoo):
        model = transformers.BertModel(_config()).eval()
        heads = {}
        for task in TASK_WORDS:
            heads[task] = torch.nn.Linear(32, CLASSES[task])
            heads[task].load_state_dict(load_file(zoo.head(task)))
        return model, heads

    def _predict(self, model, head, texts: list[str]) -> torch.Tensor:
        if self._tokenizer is None:
            self._tokenizer = transformers.AutoTokenizer.from_pretrained(self.hf)
        enc = dict(self._tokenizer(texts, padding=True, return_tensors="pt"))
        with torch.no_grad():
            return head(mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])).argmax(-1)

    def split_texts(self, split):
        """Labels: the fine-tuned model's own answers (computed once from the cached zoo)."""
        if not self._labels:
            zoo = get_zoo(self, self.cache, log=lambda m: None)
            model, heads = self._model_and_heads(zoo)
            for task in TASK_WORDS:
                model.load_state_dict(load_file(zoo.models[task]))
                for s in PER_SPLIT:
                    self._labels[task, s] = self._predict(model, heads[task], _texts(task, s)).tolist()
        out = {t: (_texts(t, split), self._labels[t, split]) for t in TASK_WORDS}
        if self.misroute and split == "val":
            names = list(TASK_WORDS)
            out = {names[(k + 1) % 3]: out[t] for k, t in enumerate(names)}
        return out

    def evaluator(self, zoo, split="test"):
        model, heads = self._model_and_heads(zoo)
        test = self.split_texts(split)

        def evaluate(task, state_dict):
            model.load_state_dict(state_dict)
            texts, labels = test[task]
            return float((self._predict(model, heads[task], texts) == torch.tensor(labels)).float().mean())

        return evaluate

    def serving_reason(self):
        return None

    def serve_options(self, zoo):
        _, heads = self._model_and_heads(zoo)
        return {"heads": heads, "labels": {t: [f"{t}{i}" for i in range(n)] for t, n in CLASSES.items()},
                "hf_dir": self.hf}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("routed")
    hf = write_hf_dir(root / "hf")
    suite = TinyRoutingSuite(hf, root / "cache")
    zoo = get_zoo(suite, root / "cache", log=lambda m: None)
    return suite, zoo, root


def _register(monkeypatch, suite):
    suites.get_suite("digits")  # fills the registry, then adds the tiny suite to it
    monkeypatch.setitem(suites.SUITES, "tinyroute", lambda: suite)


def test_labelled_texts_and_calibration_come_from_the_splits(tiny):
    suite, _, _ = tiny
    val = suite.labelled_texts("val")
    assert [t for _, t, _ in val] == [t for t in TASK_WORDS for _ in range(PER_SPLIT["val"])]
    assert suite.router_calibration() == [(x, t) for x, t, _ in val]
    assert all(set(x.split()) <= set(TASK_WORDS[t]) for x, t in suite.router_calibration())
    some = suite.router_calibration(per_task=4)  # evenly spread: rows 0, 10, 20, 30 of each task
    assert some == [(suite.split_texts("val")[t][0][i], t) for t in TASK_WORDS for i in (0, 10, 20, 30)]
    with pytest.raises(ConfigError, match="fewer than the 41 asked per task"):
        suite.router_calibration(per_task=41)


def test_non_text_suites_have_no_calibration():
    with pytest.raises(ConfigError, match="'digits' is not a text suite"):
        suites.get_suite("digits").router_calibration()


def test_route_train_with_the_suites_validation_split(tiny, tmp_path, monkeypatch):
    suite, zoo, root = tiny
    _register(monkeypatch, suite)
    tasks = flexmerge.load_tasks(zoo.base, zoo.models)
    out = tmp_path / "twin"
    flexmerge.merge_to_disk(tasks, out, size=1.5, method="twin", params={"rank": 2})
    r = CliRunner().invoke(app, ["route", "train", str(out), "--suite", "tinyroute", "--per-task", "30",
                                 "--cache-dir", str(root / "cache"), "--batch-size", "30", "--epochs", "25"])
    assert r.exit_code == 0, r.output
    assert "trained on 90 examples" in r.output and "calibration routing accuracy 1.000" in r.output
    rt = flexmerge.serve.Runtime.load(out, **suite.serve_options(zoo))
    test = suite.labelled_texts("test")
    routed = rt.predict_routed([x for x, _, _ in test])
    assert sum(a["task"] == t for a, (_, t, _) in zip(routed, test)) >= 0.9 * len(test)
    r = CliRunner().invoke(app, ["route", "predict", str(out), "--suite", "tinyroute", "--cache-dir",
                                 str(root / "cache"), "--text", "cat dog mat", "--text", "red big"])
    assert r.exit_code == 0, r.output
    assert [json.loads(line)["task"] for line in r.output.splitlines()] == ["a", "b"]


@pytest.mark.parametrize("argv, message", [
    ([], "exactly one of --calibration FILE"),
    (["--calibration", "c.jsonl", "--suite", "tinyroute"], "exactly one of --calibration FILE"),
    (["--calibration", "c.jsonl", "--per-task", "3"], "--per-task and --cache-dir go with --suite"),
    (["--suite", "digits"], "'digits' is not a text suite"),
    (["--suite", "wordnet"], "not the wordnet suite's"),
])
def test_route_train_errors_are_clear(tiny, tmp_path, monkeypatch, argv, message):
    suite, zoo, _ = tiny
    _register(monkeypatch, suite)
    out = tmp_path / "ta"
    flexmerge.merge_to_disk(flexmerge.load_tasks(zoo.base, zoo.models), out, size=1.0)
    r = CliRunner().invoke(app, ["route", "train", str(out), *argv])
    if "wordnet" in argv and suites.get_suite("wordnet").unavailable_reason():
        pytest.skip("wordnet suite unavailable here")
    assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output


def _routed_sweep(suite, zoo, methods=("task_arithmetic", "twin:rank=2"), sizes=(1, 1.5)):
    tasks = flexmerge.load_tasks(zoo.base, zoo.models)
    return sweep(tasks, suite.evaluator(zoo), methods=methods, sizes=sizes,
                 routed=SuiteRouting(suite, zoo, batch_size=30, epochs=25))


def test_routed_sweep_scores_each_twin_point_without_task_ids(tiny):
    suite, zoo, root = tiny
    result = _routed_sweep(suite, zoo)
    curves = result.curves()
    assert set(curves) == {"task_arithmetic", "twin:rank=2", "twin:rank=2 routed"}
    known, routed = curves["twin:rank=2"], curves["twin:rank=2 routed"]
    assert [p["size"] for p in routed] == [p["size"] for p in known] and known[0]["requested_size"] == 1.5
    assert all(p["router_accuracy"] >= 0.9 for p in routed)
    for k, r in zip(known, routed):  # routed home almost always: about the known-task accuracy, never above
        assert k["normalized"] - 0.15 <= r["normalized"] <= k["normalized"] + 1e-6
    misrouted = _routed_sweep(TinyRoutingSuite(suite.hf, root / "cache", misroute=True), zoo, ["twin:rank=2"], [1.5])
    bad = misrouted.curves()["twin:rank=2 routed"]
    assert all(p["router_accuracy"] <= 0.1 for p in bad)
    assert all(b["normalized"] <= 0.1 < k["normalized"] for b, k in zip(bad, known))
    assert misrouted.curves()["twin:rank=2"] == known  # the known-task evaluation does not route


def test_cli_routed_sweep_writes_routed_columns_and_plots(tiny, tmp_path, monkeypatch):
    suite, zoo, root = tiny
    _register(monkeypatch, suite)
    r = CliRunner().invoke(app, ["sweep", "--suite", "tinyroute", "--methods", "task_arithmetic,twin:rank=2",
                                 "--sizes", "1,1.5", "--cache-dir", str(root / "cache"), "--routed",
                                 "--out", str(tmp_path / "res")])
    assert r.exit_code == 0, r.output
    assert "twin:rank=2 routed" in r.output and "router accuracy" in r.output
    data = json.loads((tmp_path / "res" / "results.json").read_text())
    routed = [x for x in data["records"] if x["routed"]]
    assert {x["task"] for x in routed} == set(TASK_WORDS) and all(x["method"] == "twin:rank=2" for x in routed)
    assert all(x["router_accuracy"] is not None and x["normalized"] is not None for x in routed)
    assert data["meta"]["routed"]["mode"] == "argmax" and data["meta"]["routed"]["calibration_examples"] == 120
    header = (tmp_path / "res" / "results.csv").read_text().splitlines()[0].split(",")
    assert header[-2:] == ["routed", "router_accuracy"]
    assert "Routed (no task ids)" in (tmp_path / "res" / "ranking.md").read_text()
    assert (tmp_path / "res" / "normalized_accuracy.png").stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["--suite", "tinyroute", "--methods", "task_arithmetic,ties"], "names no twin method"),
    (["--suite", "digits", "--methods", "twin:rank=2"], "--routed needs a text suite"),
    (["--base", "b.safetensors", "--model", "a=a.safetensors", "--evaluator", "m:f"], "--routed goes with --suite"),
])
def test_routed_sweep_errors_are_clear_and_come_first(tiny, tmp_path, monkeypatch, argv, message):
    suite, _, _ = tiny
    _register(monkeypatch, suite)
    r = CliRunner().invoke(app, ["sweep", *argv, "--routed", "--cache-dir", str(tmp_path / "cache"),
                                 "--out", str(tmp_path / "res")])
    assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output
    assert not (tmp_path / "cache").exists() and not (tmp_path / "res").exists()  # nothing built, nothing written
