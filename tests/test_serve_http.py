"""`flexmerge serve` end to end: the real server process on a tiny Hugging Face artifact, real HTTP
requests (one per task, concurrent mixed tasks, bad bodies, unknown task, limits), answers checked
against `Runtime.predict` in this process, then a graceful SIGTERM shutdown."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import flexmerge  # noqa: E402
from tests.conftest import bert_config  # noqa: E402

WORDS = ("the a film movie good bad great awful plot actor story fun dull long short best worst love hate "
         "music scene end start day night cat dog red blue green big small fast slow happy sad old new one "
         "two three is was not very").split()
LABELS = {"a": ["neg", "pos"], "b": ["x", "y", "z"], "c": ["l0", "l1", "l2", "l3", "l4"]}
MAX_INPUTS, MAX_CHARS = 8, 200
SENTENCES = ["the film was good", "a very bad plot", "great music and a fun story", "the cat is not happy",
             "one two three", "dull", "the best movie of the year was not very long", "red blue green"]


def _config(vocab_size: int, labels: list[str]):
    return bert_config(labels, vocab_size=vocab_size, max_position_embeddings=64)


def build_artifact(root: Path) -> Path:
    """A base BERT and three fine-tunes with 2, 3 and 5 labels, merged to a 2x artifact."""
    root.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]  # a vocab dict: a bare vocab_file reads as empty
    tokenizer = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(_config(len(tokenizer), ["l0", "l1"])).eval()
    base.save_pretrained(root / "base")
    models = {}
    for i, (task, labels) in enumerate(LABELS.items()):
        torch.manual_seed(100 + i)
        model = transformers.BertForSequenceClassification(_config(len(tokenizer), labels)).eval()
        encoder = {k: v + 0.02 * torch.randn_like(v) for k, v in base.bert.state_dict().items()}
        model.bert.load_state_dict(encoder)
        torch.nn.init.normal_(model.classifier.weight, std=1.0)  # decisive labels: no near-ties to compare
        model.save_pretrained(root / task)
        tokenizer.save_pretrained(root / task)
        models[task] = root / task
    tasks = flexmerge.load_tasks(root / "base", models)
    out = root / "flex-2x"
    flexmerge.merge_to_disk(tasks, out, size=2.0)
    return out


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return build_artifact(tmp_path_factory.mktemp("serve-zoo"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, body: bytes | None = None, content_type: str = "application/json",
             timeout: float = 30) -> tuple[int, dict]:
    """(status, JSON body) of one request; HTTP errors are answers too."""
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET",
                                 headers={"Content-Type": content_type} if body is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class Server:
    """`flexmerge serve` in a subprocess, its output in `log` (later flags override the defaults
    here); `env`: added to the environment; `nofile`: its descriptor limit (soft and hard), as
    `ulimit -n` would set it."""

    def __init__(self, artifact: Path, port: int, log: Path, *flags: str, nofile: int | None = None,
                 env: dict[str, str] | None = None):
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.log = log
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        cmd = [sys.executable, "-m", "flexmerge", "serve", str(artifact), "--port", str(port),
               "--max-inputs", str(MAX_INPUTS), "--max-chars", str(MAX_CHARS), "--max-batch", "16",
               "--batch-wait-ms", "20", *flags]
        limit = None if nofile is None else (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)))
        self.proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=limit)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_healthy(self, limit_s: float = 60) -> None:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if _request(self.url + "/health", timeout=2) == (200, {"status": "ok", "tasks": 3}):
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        pytest.fail(f"server not healthy within {limit_s} s:\n{self.output()}")

    def predict(self, task: str, payload) -> tuple[int, dict]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return _request(f"{self.url}/v1/tasks/{task}/predict", body)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    @contextlib.contextmanager
    def running(self) -> Iterator["Server"]:
        """The server once healthy; killed on the way out, whether it got healthy or not."""
        try:
            self.wait_healthy()
            yield self
        finally:
            self.stop()


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    s = Server(artifact, _free_port(), tmp_path_factory.mktemp("serve-log") / "server.log")
    with s.running():
        yield s


@pytest.fixture(scope="module")
def runtime(artifact):
    from flexmerge.serve import Runtime

    return Runtime.load(artifact)


def _assert_same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g["label"] == w["label"]
        assert g["score"] == pytest.approx(w["score"], abs=1e-5)
        assert g["scores"].keys() == w["scores"].keys()
        for label, p in w["scores"].items():
            assert g["scores"][label] == pytest.approx(p, abs=1e-5)


def test_tasks_endpoint(server, runtime):
    status, body = _request(server.url + "/tasks")
    assert status == 200
    assert body["size"] == pytest.approx(runtime.size)
    assert body["tasks"] == [runtime.task_info(t) for t in runtime.tasks]
    assert {t["task"]: t["labels"] for t in body["tasks"]} == LABELS


def test_one_request_per_task(server, runtime):
    for task in LABELS:
        status, body = server.predict(task, {"inputs": SENTENCES[:3]})
        assert status == 200, body
        assert body["task"] == task
        _assert_same(body["outputs"], runtime.predict(task, SENTENCES[:3]))


def test_concurrent_mixed_tasks(server, runtime):
    jobs = [(list(LABELS)[i % 3], SENTENCES[i % len(SENTENCES):][:1 + i % 3]) for i in range(20)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda j: server.predict(*j[:1], {"inputs": j[1]}), jobs))
    for (task, inputs), (status, body) in zip(jobs, answers):
        assert status == 200, body
        assert body["task"] == task
        _assert_same(body["outputs"], runtime.predict(task, inputs))


@pytest.mark.parametrize("payload, words", [
    (b"this is not json", "not valid JSON"),
    ({"inputs": "x"}, "inputs: Input should be a valid list"),
    ({"inputs": []}, "inputs: List should have at least 1 item"),
    ({"inputs": [1]}, "inputs[0]: Input should be a valid string"),
])
def test_bad_bodies_are_422(server, payload, words):
    status, body = server.predict("a", payload)
    assert status == 422, body
    assert words in body["detail"]


def test_limits_are_413(server):
    status, body = server.predict("b", {"inputs": ["dull"] * (MAX_INPUTS + 1)})
    assert status == 413 and f"at most {MAX_INPUTS}" in body["detail"]
    status, body = server.predict("b", {"inputs": ["dull", "x" * (MAX_CHARS + 1)]})
    assert status == 413 and f"at most {MAX_CHARS}" in body["detail"]


def test_unknown_task_is_404(server):
    status, body = server.predict("nope", {"inputs": ["the film"]})
    assert status == 404
    assert body == {"detail": "unknown task 'nope'; this model serves: a, b, c"}


def test_sigterm_shuts_down_gracefully(server):
    # after every bad request above, the server still answers
    assert _request(server.url + "/health") == (200, {"status": "ok", "tasks": 3})
    assert server.predict("c", {"inputs": ["the end"]})[0] == 200
    server.proc.send_signal(signal.SIGTERM)
    try:
        code = server.proc.wait(15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"server still running 15 s after SIGTERM:\n{server.output()}")
    assert code == 0, server.output()
    assert "Traceback" not in server.output(), server.output()


def test_work_queued_past_the_grace_period_is_answered_503(artifact, tmp_path):
    """SIGTERM with more queued than the grace period can run: what cannot start within 80% of it
    gets a JSON 503, never a cancelled request's plain-text 500; the server exits 0."""
    server = Server(artifact, _free_port(), tmp_path / "server.log", "--max-batch", "1", "--max-inputs", "64",
                    "--grace-s", "1")
    with server.running():
        body = {"inputs": [SENTENCES[i % len(SENTENCES)] for i in range(64)]}  # 64 one-input passes a request
        with ThreadPoolExecutor(48) as pool:
            answers = [pool.submit(server.predict, "a", body) for _ in range(48)]
            time.sleep(0.5)  # every request sent and queued
            server.proc.send_signal(signal.SIGTERM)
            statuses = [a.result()[0] for a in answers]
        assert server.proc.wait(15) == 0, server.output()
    assert set(statuses) <= {200, 503} and 503 in statuses, statuses
    assert "Traceback" not in server.output(), server.output()
