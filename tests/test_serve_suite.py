"""Serving encoders with external heads (the wordnet suite's layout: plain safetensors encoders, one
Linear head per task on mean-pooled features), on a tiny BERT: predictions equal head(pool(encoder)),
a mixed batch is one encoder pass, and `flexmerge serve --suite` merges, caches and serves a zoo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import flexmerge
from flexmerge.errors import ConfigError, FlexMergeError
from flexmerge.flexmodel.format import MANIFEST
from flexmerge.suites.base import Suite, Zoo
from tests.conftest import bert_config, word_tokenizer

transformers = pytest.importorskip("transformers")
from flexmerge.runtime import Runtime  # noqa: E402
from flexmerge.runtime.batching import MixedModule  # noqa: E402
from flexmerge.suites.serving import suite_artifact, suite_runtime  # noqa: E402
from flexmerge.suites.wordnet import WordNetSuite  # noqa: E402

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "bird", "flew", "over", "tree", "red", "blue", "big", "small",
         "runs", "fast", "slow", "house", "car"]
LABELS = {"a": ["no", "yes"], "b": ["x", "y", "z"], "c": ["c0", "c1", "c2", "c3", "c4"]}
TEXTS = ["the cat sat on the mat", "a bird flew over the tree", "big red car", "small blue house runs fast",
         "dog", "the slow dog sat"]


def _config():
    return bert_config(2, vocab_size=5 + len(WORDS), max_position_embeddings=64, architectures=["BertModel"])


def write_hf_dir(directory: Path) -> Path:
    """What the suite's `minilm_dir()` is to MiniLM: config.json and the tokenizer's files."""
    directory.mkdir(parents=True, exist_ok=True)
    _config().save_pretrained(directory)
    word_tokenizer(WORDS).save_pretrained(directory)
    return directory


def write_zoo(directory: Path) -> None:
    """base.safetensors, models/<task>.safetensors (embeddings frozen, as the suite fine-tunes) and
    heads/<task>.safetensors (Linear weight/bias): the wordnet zoo's layout."""
    for sub in ("models", "heads"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base = transformers.BertModel(_config()).eval().state_dict()
    save_file(base, str(directory / "base.safetensors"))
    for i, (task, names) in enumerate(LABELS.items()):
        g = torch.Generator().manual_seed(10 + i)
        ft = {k: v if k.startswith("embeddings.") else v + 0.02 * torch.randn(v.shape, generator=g)
              for k, v in base.items()}
        save_file(ft, str(directory / "models" / f"{task}.safetensors"))
        head = torch.nn.Linear(32, len(names))
        save_file(head.state_dict(), str(directory / "heads" / f"{task}.safetensors"))


def read_heads(directory: Path) -> dict[str, torch.nn.Linear]:
    heads = {}
    for task in LABELS:
        sd = load_file(directory / "heads" / f"{task}.safetensors")
        heads[task] = torch.nn.Linear(sd["weight"].shape[1], sd["weight"].shape[0])
        heads[task].load_state_dict(sd)
    return heads


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-suite")
    write_zoo(root / "zoo")
    hf = write_hf_dir(root / "hf")
    models = {t: root / "zoo" / "models" / f"{t}.safetensors" for t in LABELS}
    tasks = flexmerge.load_tasks(root / "zoo" / "base.safetensors", models)
    for size in (2, 3):
        flexmerge.merge_to_disk(tasks, root / f"flex-{size}x", size=float(size))
    return root, hf, read_heads(root / "zoo")


def _runtime(root, hf, heads, size=2, **kw):
    return Runtime.load(root / f"flex-{size}x", heads=heads, labels=LABELS, hf_dir=hf, **kw)


def _reference(encoder_state: dict[str, torch.Tensor], head, hf: Path, texts: list[str]) -> torch.Tensor:
    """head(pool(encoder(x))) computed directly, pooled by the wordnet suite's own `pooled`."""
    model = transformers.BertModel(_config()).eval()
    model.load_state_dict(encoder_state)
    batch = dict(transformers.AutoTokenizer.from_pretrained(hf)(texts, padding=True, return_tensors="pt"))
    with torch.no_grad():
        return torch.softmax(head(WordNetSuite.pooled(model, batch, torch.arange(len(texts)))), -1)


def _probs(result, names):
    return torch.tensor([result["scores"][n] for n in names])


@pytest.mark.parametrize("size", [2, 3])
def test_predict_is_the_head_on_pooled_features_of_the_tasks_encoder(setup, size):
    root, hf, heads = setup
    rt = _runtime(root, hf, heads, size)
    flex = flexmerge.load(root / f"flex-{size}x")
    for task, names in LABELS.items():
        assert rt.task_info(task) == {"task": task, "kind": "text-classification", "labels": names}
        # 2x: the artifact's merged weights for the task; 3x (= M): the fine-tuned encoder itself
        state = flex.state_dict(task) if size == 2 else load_file(root / "zoo" / "models" / f"{task}.safetensors")
        want = _reference(state, heads[task], hf, TEXTS)
        got = rt.predict(task, TEXTS)
        for row, g in enumerate(got):
            torch.testing.assert_close(_probs(g, names), want[row], rtol=0, atol=1e-5)
            assert g["label"] == names[int(want[row].argmax())]


def test_a_mixed_batch_is_one_encoder_pass_and_equals_per_task_predictions(setup):
    root, hf, heads = setup
    rt = _runtime(root, hf, heads)
    items = [(t, x) for x in TEXTS for t in ("c", "a", "b")][:14]
    mixed, _ = rt._mixed_model()
    routed = [m for m in mixed.modules() if isinstance(m, MixedModule)]
    calls, head_rows = [], {t: [] for t in LABELS}
    for m in routed:
        m.register_forward_hook(lambda mod, *a: calls.append(mod))
    hooks = [h.register_forward_hook(lambda mod, args, out, t=t: head_rows[t].append(args[0].shape[0]))
             for t, h in heads.items()]
    try:
        got = rt.predict_mixed(items)
    finally:
        for h in hooks:
            h.remove()
    assert routed and len(calls) == len(routed) and len(set(map(id, calls))) == len(routed)  # one encoder pass
    assert head_rows == {t: [sum(1 for task, _ in items if task == t)] for t in LABELS}  # each head once, its rows
    for (task, text), g in zip(items, got):
        alone = rt.predict(task, [text])[0]
        assert g["label"] == alone["label"] and g["scores"] == pytest.approx(alone["scores"], abs=1e-5)


def test_tasks_without_a_head_are_feature_extraction_beside_head_tasks(setup):
    root, hf, heads = setup
    rt = Runtime.load(root / "flex-2x", heads={"a": heads["a"]}, hf_dir=hf)
    assert rt.task_info("a")["labels"] == ["LABEL_0", "LABEL_1"]
    assert rt.task_info("c") == {"task": "c", "kind": "feature-extraction", "labels": None}
    got = rt.predict_mixed([("c", TEXTS[0]), ("a", TEXTS[1]), ("c", TEXTS[2])])
    assert set(got[1]) == {"label", "score", "scores"} and len(got[0]["embedding"]) == 32
    assert got[2]["embedding"] == pytest.approx(rt.predict("c", [TEXTS[2]])[0]["embedding"], abs=1e-5)


def test_max_length_cuts_inputs_as_the_suite_encodes_them(setup):
    root, hf, heads = setup
    rt = _runtime(root, hf, heads, max_length=4)
    flex = flexmerge.load(root / "flex-2x")
    text = "the cat sat on the mat"
    want = _reference(flex.state_dict("b"), heads["b"], hf, ["the cat"])  # [CLS] the cat [SEP]: 4 tokens
    torch.testing.assert_close(_probs(rt.predict("b", [text])[0], LABELS["b"]), want[0], rtol=0, atol=1e-5)


def test_bad_heads_and_labels_are_clear_errors(setup):
    root, hf, heads = setup
    with pytest.raises(ConfigError, match="unknown task 'zz'"):
        Runtime.load(root / "flex-2x", heads={"zz": heads["a"]}, hf_dir=hf)
    with pytest.raises(ConfigError, match="3 label names for a head of 2 outputs"):
        Runtime.load(root / "flex-2x", heads=heads, labels={**LABELS, "a": ["p", "q", "r"]}, hf_dir=hf)
    with pytest.raises(ConfigError, match="which has no head"):
        Runtime.load(root / "flex-2x", labels={"a": ["no", "yes"]}, hf_dir=hf)
    with pytest.raises(FlexMergeError, match="hf_dir"):  # plain safetensors inputs: no config in the artifact
        Runtime.load(root / "flex-2x", heads=heads).predict("a", ["x"])


def test_the_http_app_serves_head_tasks(setup):
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from flexmerge.serve.server import create_app

    root, hf, heads = setup
    rt = _runtime(root, hf, heads)
    with TestClient(create_app(rt)) as client:
        tasks = client.get("/tasks").json()["tasks"]
        assert [t["labels"] for t in tasks] == list(LABELS.values())
        out = client.post("/v1/tasks/b/predict", json={"inputs": TEXTS[:2]}).json()["outputs"]
    for o, want in zip(out, rt.predict("b", TEXTS[:2])):
        assert o["label"] == want["label"] and o["scores"] == pytest.approx(want["scores"], abs=1e-6)


# --------------------------------------------------------------------------- serving a suite's zoo


class TinySuite(Suite):
    """The wordnet suite's zoo layout and serve options, on the tiny BERT (builds in a second)."""

    name = "tinytext"
    description = "tiny BERT, 3 tasks with external heads"

    def __init__(self, hf: Path):
        self.hf = hf
        self.builds = 0

    def task_names(self):
        return list(LABELS)

    def config(self):
        return {"version": 1}

    def build(self, directory):
        self.builds += 1
        write_zoo(directory)
        return {}

    def evaluator(self, zoo):
        return lambda task, state_dict: 0.0

    def serving_reason(self):
        return None

    def serve_options(self, zoo: Zoo):
        return {"heads": read_heads(zoo.directory), "labels": LABELS, "hf_dir": self.hf}


def test_suite_artifact_merges_once_and_is_reused(setup, tmp_path):
    _, hf, _ = setup
    suite, logs = TinySuite(hf), []
    path, zoo = suite_artifact(suite, 2, cache_dir=tmp_path, log=logs.append)
    assert path == tmp_path / "served" / f"{zoo.directory.name}-task_arithmetic-2x"
    assert flexmerge.load(path).size <= 2.0 and any("merging" in m for m in logs)
    stamp = (path / MANIFEST).stat().st_mtime_ns
    logs.clear()
    assert suite_artifact(suite, 2.0, cache_dir=tmp_path, log=logs.append)[0] == path
    assert not any("merging" in m for m in logs) and suite.builds == 1
    assert (path / MANIFEST).stat().st_mtime_ns == stamp  # reused, not rewritten
    rt = suite_runtime(suite, 2, cache_dir=tmp_path, log=logs.append)
    assert rt.task_info("c")["labels"] == LABELS["c"] and len(rt.predict("c", ["dog"])) == 1


def test_suite_artifact_takes_a_method_with_its_parameters(setup, tmp_path):
    _, hf, _ = setup
    suite = TinySuite(hf)
    with pytest.raises(ConfigError):
        suite_artifact(suite, 2, method="twin:rank=-1", cache_dir=tmp_path)
    assert suite.builds == 0  # a bad parameter fails before the zoo is built
    path, zoo = suite_artifact(suite, 2, method="twin:rank=2", cache_dir=tmp_path, log=lambda m: None)
    assert path.name == f"{zoo.directory.name}-twin_rank=2-2x"
    method = json.loads((path / MANIFEST).read_text())["method"]
    assert method["name"] == "twin" and method["rank"] == 2, method


def test_suite_artifact_refuses_suites_that_take_no_text_before_building(tmp_path):
    from flexmerge.suites import get_suite

    digits = get_suite("digits")
    with pytest.raises(ConfigError, match="'digits' is not a text suite"):
        suite_artifact(digits, 2, cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # no zoo was built


def test_cli_serve_suite_builds_merges_and_serves(setup, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import flexmerge.serve.server as server
    import flexmerge.suites as suites
    from flexmerge.cli import app

    _, hf, _ = setup
    suites.get_suite("digits")  # fills the registry, then adds the tiny text suite to it
    monkeypatch.setitem(suites.SUITES, "tinytext", lambda: TinySuite(hf))
    served = {}
    monkeypatch.setattr(server, "run_server", lambda app, host, port, **kw: served.update(app=app, port=port))
    result = CliRunner().invoke(app, ["serve", "--suite", "tinytext", "--size", "2", "--cache-dir", str(tmp_path),
                                      "--port", "8123"])
    assert result.exit_code == 0, result.output
    assert served["port"] == 8123 and (tmp_path / "served").is_dir()


@pytest.mark.parametrize("argv, message", [
    (["serve"], "give an artifact directory (flexmerge serve DIR) or --suite"),
    (["serve", "some-dir", "--suite", "wordnet", "--size", "2"], "not both"),
    (["serve", "--suite", "digits", "--size", "2"], "'digits' is not a text suite"),
    (["serve", "--suite", "wordnet"], "needs --size"),
    (["serve", "some-dir", "--size", "2"], "go with --suite"),
])
def test_cli_serve_errors_are_clear(argv, message, tmp_path):
    from typer.testing import CliRunner

    from flexmerge.cli import app

    result = CliRunner().invoke(app, argv + (["--cache-dir", str(tmp_path)] if "--suite" in argv else []))
    assert result.exit_code == 2 and message in " ".join(result.output.split())
