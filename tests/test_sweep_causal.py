"""`flexmerge sweep` on your own causal LMs: `--eval-data` with prompt/completion and chat rows,
scored by exact match of greedy completions or, with `--eval-metric loglik`, by the completions'
token probability. The scores are checked against transformers' own `generate`, one prompt at a
time (no padding), and against the log-likelihood written out here, on the exported models."""

from __future__ import annotations

import json
import random
import re
import shutil

import pytest
import torch
from typer.testing import CliRunner

import flexmerge
from flexmerge.cli import app
from flexmerge.errors import ConfigError
from flexmerge.evaluation import GenerationRow, normalize, read_generation_rows
from tests.conftest import bert_config, llama_config, llama_tokenizer, word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
runner = CliRunner()

LETTERS = list("abcdefgh")
TASKS = ("copy", "rev", "next")
SEEN, UNSEEN = 14, 6  # the fine-tunes learn the first 14 rows of their file; 6 they never saw



def _rows(task: str) -> list[dict]:
    """Each task's file: 2-4 letters copied, reversed (with a full stop, which normalization drops), or
    each moved to the next letter (a chat, one row with a system message)."""
    rng = random.Random(0)
    rows = []
    for n in range(SEEN + UNSEEN):
        xs = rng.sample(LETTERS[:-1], 2 + n % 3)
        if task == "copy":
            rows.append({"prompt": f"copy {' '.join(xs)} =", "completion": " ".join(xs)})
        elif task == "rev":
            rows.append({"prompt": f"rev {' '.join(xs)} =", "completion": " ".join(xs[::-1]) + "."})
        else:
            answer = " ".join(chr(ord(c) + 1) for c in xs)
            system = [{"role": "system", "content": "next"}] if n == 3 else []
            rows.append({"messages": [*system, {"role": "user", "content": f"next {' '.join(xs)}"},
                                      {"role": "assistant", "content": answer}]})
    return rows


def _prompt_ids(tok, row: dict) -> list[int]:
    """The prompt as documented: a chat rendered by the template (its own BOS), a prompt with the tokenizer's."""
    if "messages" in row:
        text = tok.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]
    return tok(row["prompt"])["input_ids"]


def _completion(row: dict) -> str:
    return row["messages"][-1]["content"] if "messages" in row else row["completion"]


def _train(base, tok, rows: list[dict], seed: int):
    """Full fine-tune of `base` on prompt -> completion + EOS (loss on the completion only), seeded;
    it moves the weights by about 30% of their norm (the base's init is wide enough for that)."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(base.config)
    model.load_state_dict(base.state_dict())
    seqs = [(_prompt_ids(tok, r), tok(_completion(r), add_special_tokens=False)["input_ids"] + [2]) for r in rows]
    width = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), width), 2)
    labels = torch.full((len(seqs), width), -100)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (p, c) in enumerate(seqs):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p):len(p) + len(c)] = torch.tensor(c)
        mask[i, :len(p) + len(c)] = 1
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    """A random tiny Llama base and three fine-tunes that learned their rows, each saved with its
    tokenizer (only `next` has a chat template), and each task's JSONL file."""
    root = tmp_path_factory.mktemp("causal")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(llama_config(max_position_embeddings=32)).eval()
    base.save_pretrained(root / "base")
    llama_tokenizer().save_pretrained(root / "base")
    data = {}
    for seed, task in enumerate(TASKS):
        tok = llama_tokenizer(chat=task == "next")
        rows = _rows(task)
        _train(base, tok, rows[:SEEN], seed).save_pretrained(root / task)
        tok.save_pretrained(root / task)
        data[task] = root / f"{task}.jsonl"
        data[task].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, data


def _models_args(root) -> list[str]:
    return ["--base", str(root / "base"), *[x for t in TASKS for x in ("--model", f"{t}={root / t}")]]


def _data_args(data) -> list[str]:
    return [x for t, path in data.items() for x in ("--eval-data", f"{t}={path}")]


def _normalized(text: str) -> str:
    """The documented rule, written out again: lowercase, whitespace collapsed, trailing .,;:!? dropped."""
    return re.sub(r"[\s.,;:!?]+$", "", re.sub(r"\s+", " ", text.lower()).strip())


def _exact_match(model_dir, rows: list[dict]) -> float:
    """transformers' generate, greedy, one prompt at a time (no padding), stopped at EOS or after the
    longest reference completion (in tokens) + 8 new tokens."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    budget = max(len(tok(_completion(r), add_special_tokens=False)["input_ids"]) for r in rows) + 8
    hits = 0
    for row in rows:
        ids = torch.tensor([_prompt_ids(tok, row)])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget,
                                 do_sample=False, pad_token_id=tok.eos_token_id)
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        hits += _normalized(text) == _normalized(_completion(row))
    return hits / len(rows)


def _token_probability(model_dir, rows: list[dict]) -> float:
    """exp(sum over rows and completion tokens of log p(token | everything before it) / number of tokens)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    total, count = 0.0, 0
    for row in rows:
        prompt = _prompt_ids(tok, row)
        completion = tok(_completion(row), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        for k, token in enumerate(completion):
            total += float(logp[len(prompt) + k - 1, token])
            count += 1
    return float(torch.exp(torch.tensor(total / count)))


def _read(data, task) -> list[dict]:
    return [json.loads(line) for line in data[task].read_text().splitlines()]


def _sweep(root, data, out, *extra) -> dict:
    result = runner.invoke(app, ["sweep", *_models_args(root), *_data_args(data), "--methods", "task_arithmetic",
                                 "--sizes", "1.5,3", "--eval-batch-size", "4", "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "results.json").read_text()), result.output


def _export_merged(root, tmp_path, size: float) -> dict[str, object]:
    """The artifact that `merge --size` writes for the sweep's point, each task exported as a plain model."""
    tasks = flexmerge.load_tasks(root / "base", {t: root / t for t in TASKS})
    flexmerge.merge_to_disk(tasks, tmp_path / "flex", method="task_arithmetic", size=size)
    flex = flexmerge.load(tmp_path / "flex")
    return {t: flexmerge.export(flex, t, tmp_path / f"export-{t}") for t in TASKS}


def test_exact_match_is_what_generate_gives_at_mx_and_at_a_merged_size(causal, tmp_path):
    root, data = causal
    saved, output = _sweep(root, data, tmp_path / "results")
    assert saved["meta"]["evaluator"]["metric"] == "exact"
    for task in TASKS:  # the fine-tunes learned their 14 rows; the 6 unseen ones are mostly missed
        rows = _read(data, task)
        assert saved["finetuned"][task] == pytest.approx(_exact_match(root / task, rows), abs=1e-12)
        assert saved["finetuned"][task] >= SEEN / len(rows) - 0.001
    mx = [r for r in saved["records"] if r["requested_size"] == 3]
    assert len(mx) == 3 and all(r["accuracy"] == saved["finetuned"][r["task"]] for r in mx)
    merged = {r["task"]: r for r in saved["records"] if r["requested_size"] == 1.5}
    exported = _export_merged(root, tmp_path, 1.5)
    for task in TASKS:
        assert merged[task]["accuracy"] == pytest.approx(_exact_match(exported[task], _read(data, task)), abs=1e-12)
    assert "fine-tuned mean exact match" in output


def test_loglik_is_the_completions_token_probability(causal, tmp_path):
    root, data = causal
    saved, output = _sweep(root, data, tmp_path / "results", "--eval-metric", "loglik", "--eval-limit", "9")
    assert saved["meta"]["evaluator"]["metric"] == "loglik"
    for task in TASKS:
        want = _token_probability(root / task, _read(data, task)[:9])
        assert saved["finetuned"][task] == pytest.approx(want, rel=1e-5) and 0.9 < want <= 1.0
    exported = _export_merged(root, tmp_path, 1.5)
    for r in saved["records"]:
        if r["requested_size"] == 1.5:
            want = _token_probability(exported[r["task"]], _read(data, r["task"])[:9])
            assert r["accuracy"] == pytest.approx(want, rel=1e-5)
            assert r["normalized"] == pytest.approx(want / saved["finetuned"][r["task"]], rel=1e-5)
    assert "fine-tuned mean completion token probability" in output


def test_a_csv_file_of_prompts_and_completions_reads_like_jsonl(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text('prompt,completion\n"copy a, b =","a, b"\n')
    assert read_generation_rows(path) == [GenerationRow(2, "a, b", prompt="copy a, b =")]
    (tmp_path / "bad.csv").write_text("text,label\nx,1\n")
    with pytest.raises(ConfigError, match="bad.csv: a CSV file needs a header with 'prompt' and 'completion' columns"):
        read_generation_rows(tmp_path / "bad.csv")


def test_normalization_is_the_documented_rule():
    assert normalize("  Paris.\n") == "paris" == normalize("PARIS !?")
    assert normalize("c  b\ta .") == "c b a"
    assert normalize("Paris, France") == "paris, france"
    assert normalize("(a)") == "(a)"


def _with_file(root, data, task, rows) -> dict:
    path = root / f"bad-{task}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {**data, task: path}


CHAT = {"messages": [{"role": "user", "content": "next a"}, {"role": "assistant", "content": "b"}]}


@pytest.mark.parametrize("task, rows, extra, message", [
    ("copy", [{"question": "copy a =", "answer": "a"}], [],
     "row 1 has no 'prompt' and 'completion', nor 'messages' (it has ['answer', 'question']); task 'copy' is a "
     "causal LM (LlamaForCausalLM): its rows are"),
    ("rev", [{"text": "rev a b =", "label": 1}], [], "row 1 has no 'prompt' and 'completion', nor 'messages'"),
    ("copy", [{"prompt": "copy a =", "completion": "a"}, CHAT], [],
     "row 2 is a chat ('messages'), but task 'copy''s tokenizer has no chat template"),
    ("next", [{"messages": [{"role": "assistant", "content": "b"}, {"role": "user", "content": "next a"}]}], [],
     "the last message is the answer and must have role 'assistant', not 'user'"),
    ("next", [{"messages": "next a"}], [], "'messages' must be a list of at least two messages"),
    ("copy", [{"prompt": "copy a =", "completion": 3}], [], "row 1: 'completion' must be a string"),
    ("copy", [{"prompt": "copy a =", "completion": " "}], [], "row 1: 'completion' is empty"),
    ("copy", [{"prompt": "copy a =", "completion": "a"}, {"prompt": "copy " + "a " * 40, "completion": "a"}], [],
     "row 2: prompt and completion are 43 tokens, more than task 'copy''s model takes (32)"),
    ("copy", [{"prompt": "copy a =", "completion": "a"}], ["--eval-metric", "bleu"],
     "--eval-metric 'bleu': choose one of: exact, loglik"),
])
def test_rows_that_do_not_fit_a_causal_lm_are_clear_errors(causal, tmp_path, task, rows, extra, message):
    root, data = causal
    bad = _with_file(tmp_path, data, task, rows)
    result = runner.invoke(app, ["sweep", *_models_args(root), *_data_args(bad), "--sizes", "3",
                                 "--out", str(tmp_path / "r"), *extra])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


def test_eval_metric_needs_eval_data(causal, tmp_path):
    root, _ = causal
    result = runner.invoke(app, ["sweep", *_models_args(root), "--evaluator", "json:loads", "--eval-metric", "loglik",
                                 "--sizes", "3", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "--eval-metric goes with --eval-data" in result.output, result.output


@pytest.fixture
def classifiers(tmp_path):
    """A BERT classifier base and two fine-tunes, with a tokenizer, and a text+label file per task."""
    torch.manual_seed(0)
    words = ["x", "y"]
    base = transformers.BertForSequenceClassification(bert_config(2, vocab_size=10)).eval()
    dirs = {"base": tmp_path / "base", "a": tmp_path / "a", "b": tmp_path / "b"}
    for name, path in dirs.items():
        model = transformers.BertForSequenceClassification(base.config).eval()
        model.load_state_dict({k: v + (0.02 * torch.randn_like(v) if name != "base" else 0)
                               for k, v in base.state_dict().items()})
        model.save_pretrained(path)
        word_tokenizer(words).save_pretrained(path)
    data = {}
    for task in ("a", "b"):
        data[task] = tmp_path / f"{task}.jsonl"
        data[task].write_text(json.dumps({"text": "x y", "label": 1}) + "\n")
    return dirs, data


def _classifier_args(dirs, data) -> list[str]:
    return ["sweep", "--base", str(dirs["base"]), "--model", f"a={dirs['a']}", "--model", f"b={dirs['b']}",
            *_data_args(data), "--sizes", "2"]


def test_loglik_is_refused_with_classifiers(classifiers, tmp_path):
    dirs, data = classifiers
    result = runner.invoke(app, [*_classifier_args(dirs, data), "--eval-metric", "loglik",
                                 "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "--eval-metric loglik scores causal LMs" in result.output, result.output


def test_prompt_rows_given_to_a_classifier_are_a_clear_error(classifiers, tmp_path):
    dirs, data = classifiers
    data["b"].write_text(json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    result = runner.invoke(app, [*_classifier_args(dirs, data), "--out", str(tmp_path / "r")])
    flat = " ".join(result.output.split())
    assert result.exit_code == 2 and f"{data['b']}: row 1 has no 'text' and 'label'" in flat, result.output
    assert "task 'b' is a sequence classifier (BertForSequenceClassification)" in flat, result.output


def test_classifiers_and_causal_lms_in_one_sweep_are_refused(causal, tmp_path):
    """Tasks of two kinds (here `copy`'s config claims a classifier head) get no --eval-data evaluator."""
    root, data = causal
    shutil.copytree(root / "copy", tmp_path / "copy")
    config = json.loads((tmp_path / "copy" / "config.json").read_text())
    config["architectures"] = ["LlamaForSequenceClassification"]
    (tmp_path / "copy" / "config.json").write_text(json.dumps(config))
    args = [x if x != f"copy={root / 'copy'}" else f"copy={tmp_path / 'copy'}" for x in _models_args(root)]
    result = runner.invoke(app, ["sweep", *args, *_data_args(data), "--sizes", "3", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert ("--eval-data scores models of one kind; task 'copy' is a sequence classifier and task 'rev' a causal LM"
            in " ".join(result.output.split())), result.output
