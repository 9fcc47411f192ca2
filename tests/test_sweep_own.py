"""`flexmerge sweep` on your own models: scored by labelled text files (--eval-data) or by your own
evaluator (--evaluator), with the suites' outputs, and the Mx point evaluated once."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

from flexmerge.cli import app
from tests.conftest import bert_config, word_tokenizer

transformers = pytest.importorskip("transformers")
runner = CliRunner()
WORDS = [f"w{i}" for i in range(30)]
LABELS = {"pos": ["neg", "pos"], "topic": ["a", "b", "c"]}


def _config(names):
    return bert_config(names, vocab_size=5 + len(WORDS))


def _tokenizer(directory):
    word_tokenizer(WORDS).save_pretrained(directory)


@pytest.fixture
def own(tmp_path):
    """A base and two text-classification fine-tunes (2 and 3 labels), each with its tokenizer, and
    evaluation files: JSONL with label names for one task, CSV with label ids for the other."""
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(_config(["x", "y"])).eval()
    base.save_pretrained(tmp_path / "base")
    _tokenizer(tmp_path / "base")
    g = torch.Generator().manual_seed(1)
    texts = [" ".join(WORDS[int(i)] for i in torch.randint(0, 30, (5,), generator=g)) for _ in range(40)]
    data = {}
    for i, (task, names) in enumerate(LABELS.items()):
        torch.manual_seed(10 + i)
        ft = transformers.BertForSequenceClassification(_config(names)).eval()
        ft.load_state_dict({k: v + 0.02 * torch.randn_like(v) for k, v in base.state_dict().items()
                            if not k.startswith("classifier")}, strict=False)
        ft.save_pretrained(tmp_path / task)
        _tokenizer(tmp_path / task)
        labels = [int(torch.randint(0, len(names), (1,), generator=g)) for _ in texts]
        if task == "pos":
            data[task] = tmp_path / "pos.jsonl"
            data[task].write_text("".join(json.dumps({"text": t, "label": names[y]}) + "\n" for t, y in zip(texts, labels)))
        else:
            data[task] = tmp_path / "topic.csv"
            with open(data[task], "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["text", "label"])
                w.writerows(zip(texts, labels))
    return tmp_path, data, texts


def _accuracy(model_dir, path, limit=None):
    """The fine-tune's accuracy on its file, computed the ordinary way (from_pretrained)."""
    model = transformers.BertForSequenceClassification.from_pretrained(model_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    if path.suffix == ".csv":
        rows = [(r["text"], int(r["label"])) for r in csv.DictReader(open(path))]
    else:
        rows = [(r["text"], model.config.label2id[r["label"]]) for r in map(json.loads, path.read_text().splitlines())]
    rows = rows[:limit]
    with torch.no_grad():
        pred = model(**tok([t for t, _ in rows], padding=True, return_tensors="pt")).logits.argmax(-1)
    return int((pred == torch.tensor([y for _, y in rows])).sum()) / len(rows)


def _args(root):
    return ["sweep", "--base", str(root / "base"), "--model", f"pos={root / 'pos'}", "--model", f"topic={root / 'topic'}"]


def test_sweep_with_eval_data_scores_every_point_and_writes_the_suite_outputs(own):
    root, data, _ = own
    out = root / "results"
    import flexmerge

    tasks = flexmerge.load_tasks(root / "base", {t: root / t for t in LABELS})
    unit = tasks.mergeable_bytes() + tasks.specific_bytes() / 2  # one whole fine-tune, its head included
    low, top = (tasks.mergeable_bytes() + tasks.specific_bytes()) / unit, 2  # fully merged (2 heads); Mx
    result = runner.invoke(app, [*_args(root), "--eval-data", f"pos={data['pos']}", "--eval-data",
                                 f"topic={data['topic']}", "--methods", "task_arithmetic,ties",
                                 "--sizes", f"1,{low:.9f},1.5,{top:.9f}",
                                 "--eval-limit", "30", "--eval-batch-size", "7", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("results.csv", "results.json", "ranking.md", "normalized_accuracy.png", "absolute_accuracy.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    for task in LABELS:  # the reference: each fine-tune on its first 30 examples
        assert saved["finetuned"][task] == pytest.approx(_accuracy(root / task, data[task], limit=30), abs=1e-9)
    mx = [r for r in saved["records"] if r["requested_size"] == pytest.approx(top)]
    assert mx and all(r["accuracy"] == saved["finetuned"][r["task"]] and r["note"].startswith("Mx") for r in mx)
    below = [r for r in saved["records"] if r["requested_size"] == 1.0]
    assert below and all(r["accuracy"] is None and "below the minimum size" in r["note"] for r in below)
    one = [r for r in saved["records"] if r["requested_size"] == pytest.approx(low)]
    assert {r["method"] for r in one} == {"task_arithmetic", "ties"} and all(r["accuracy"] is not None for r in one)
    assert all(r["size"] <= r["requested_size"] + 1e-9 for r in saved["records"] if r["size"] is not None)
    assert "fine-tuned mean accuracy" in result.output and "pos " in result.output


EVALUATOR = '''
import json, pathlib, torch
LOG = pathlib.Path(__file__).with_name("calls.jsonl")

def score(task, state):
    """Higher is better: minus the distance of the query weights to the task's own fine-tune."""
    with LOG.open("a") as f:
        f.write(json.dumps({"task": task}) + "\\n")
    key = "bert.encoder.layer.0.attention.self.query.weight"
    ref = torch.load(pathlib.Path(__file__).with_name(task + ".pt"))
    return 1.0 / (1.0 + float((state[key] - ref).norm()))
'''


def test_sweep_with_your_own_evaluator_calls_it_once_per_task_at_mx(own, monkeypatch):
    root, _, _ = own
    from safetensors.torch import load_file

    key = "bert.encoder.layer.0.attention.self.query.weight"
    for task in LABELS:
        torch.save(load_file(root / task / "model.safetensors")[key], root / f"{task}.pt")
    (root / "my_evals.py").write_text(EVALUATOR)
    monkeypatch.chdir(root)
    import flexmerge

    tasks = flexmerge.load_tasks(root / "base", {t: root / t for t in LABELS})
    top = 2  # Mx: the unit is one whole fine-tune, its head included
    result = runner.invoke(app, [*_args(root), "--evaluator", "my_evals:score", "--methods", "task_arithmetic",
                                 "--sizes", f"1.5,{top:.9f}", "--out", str(root / "results")])
    assert result.exit_code == 0, result.output
    calls = [json.loads(line)["task"] for line in (root / "calls.jsonl").read_text().splitlines()]
    assert sorted(calls) == sorted([*LABELS, *LABELS])  # the fine-tunes once, 1.5x once; Mx reuses the fine-tunes
    saved = json.loads((root / "results" / "results.json").read_text())
    assert all(v == 1.0 for v in saved["finetuned"].values())  # distance 0 to itself
    assert all(r["normalized"] < 1.0 for r in saved["records"] if r["requested_size"] == 1.5)


@pytest.mark.parametrize("extra, message", [
    ([], "exactly one of --evaluator"),
    (["--evaluator", "nope_module:f"], "cannot import 'nope_module'"),
    (["--evaluator", "json:no_such_function"], "has no function 'no_such_function'"),
    (["--eval-data", "pos=missing.jsonl", "--eval-data", "topic=missing.csv"], "cannot read"),
    (["--eval-data", "pos=x.jsonl"], "no file for task 'topic'"),
    (["--suite", "digits"], "either --suite or your own models"),
])
def test_bad_sweep_inputs_are_clear_errors(own, extra, message):
    root, _, _ = own
    result = runner.invoke(app, [*_args(root), "--sizes", "1", "--out", str(root / "r"), *extra])
    assert result.exit_code == 2 and message in result.output, result.output


def test_labels_outside_the_task_are_a_clear_error(own):
    root, data, texts = own
    bad = root / "bad.jsonl"
    bad.write_text(json.dumps({"text": texts[0], "label": "maybe"}) + "\n")
    result = runner.invoke(app, [*_args(root), "--eval-data", f"pos={bad}", "--eval-data", f"topic={data['topic']}",
                                 "--sizes", "1", "--out", str(root / "r")])
    assert result.exit_code == 2 and "label 'maybe' is neither an id below 2 nor one of" in result.output, result.output
