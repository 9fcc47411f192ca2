"""The HTTP app and its batcher against a fake runtime: status codes, messages, batching order
across tasks, failure isolation and shutdown. Fast: no model, no server process."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")  # fastapi.testclient needs it

from fastapi.testclient import TestClient  # noqa: E402

from flexmerge.serve.batcher import Batcher, ShuttingDown  # noqa: E402
from flexmerge.serve.server import create_app  # noqa: E402


class FakeRuntime:
    """The Runtime contract, with answers that say which task and text they came from."""

    tasks = ["a", "b", "emb"]
    size = 1.5

    def __init__(self, gate: threading.Event | None = None):
        self.batches: list[list[tuple[str, str]]] = []
        self.gate = gate

    def task_info(self, task):
        if task == "emb":
            return {"task": task, "kind": "feature-extraction", "labels": None}
        return {"task": task, "kind": "text-classification", "labels": ["no", "yes"]}

    def predict(self, task, inputs):
        return self.predict_mixed([(task, x) for x in inputs])

    def predict_mixed(self, items):
        self.batches.append(list(items))
        if self.gate is not None:
            assert self.gate.wait(10)
        if any(text == "boom" for _, text in items):
            raise RuntimeError("the model exploded")
        return [self._one(t, x) for t, x in items]

    @staticmethod
    def _one(task, text):
        if task == "emb":
            return {"embedding": [float(len(text)), 0.5]}
        return {"label": f"{task}:{text}", "score": 0.75, "scores": {"no": 0.25, "yes": 0.75}}


@pytest.fixture
def client():
    rt = FakeRuntime()
    app = create_app(rt, max_inputs=4, max_chars=10, max_batch=3, batch_wait_ms=1)
    with TestClient(app) as c:
        c.runtime = rt
        yield c


def post(c, task, body, **kw):
    return c.post(f"/v1/tasks/{task}/predict", json=body, **kw)


def test_health_and_tasks(client):
    assert client.get("/health").json() == {"status": "ok", "tasks": 3}
    body = client.get("/tasks").json()
    assert body["size"] == 1.5
    assert [t["task"] for t in body["tasks"]] == ["a", "b", "emb"]
    assert body["tasks"][2] == {"task": "emb", "kind": "feature-extraction", "labels": None}


def test_predict_each_kind(client):
    r = post(client, "b", {"inputs": ["x", "y"]})
    assert r.status_code == 200
    assert r.json() == {"task": "b", "outputs": [FakeRuntime._one("b", "x"), FakeRuntime._one("b", "y")]}
    r = post(client, "emb", {"inputs": ["abc"]})
    assert r.json()["outputs"] == [{"embedding": [3.0, 0.5]}]


def test_unknown_task_is_404_naming_the_tasks(client):
    r = post(client, "zzz", {"inputs": ["x"]})
    assert r.status_code == 404
    assert r.json() == {"detail": "unknown task 'zzz'; this model serves: a, b, emb"}


@pytest.mark.parametrize("content, headers, words", [
    (b"{not json", {"Content-Type": "application/json"}, "not valid JSON"),
    (b'{"inputs": "x"}', {"Content-Type": "application/json"}, "inputs: Input should be a valid list"),
    (b'{"inputs": []}', {"Content-Type": "application/json"}, "inputs: List should have at least 1 item"),
    (b'{"inputs": [1]}', {"Content-Type": "application/json"}, "inputs[0]: Input should be a valid string"),
    (b'{"input": ["x"]}', {"Content-Type": "application/json"}, "body: unknown field 'input'; the body takes 'inputs'"),
    (b'[]', {"Content-Type": "application/json"}, 'the body must be a JSON object {"inputs"'),
    (b"", {"Content-Type": "application/json"}, "the body is missing"),
    (b'{"inputs": ["x"]}', {"Content-Type": "text/plain"}, "Content-Type: application/json"),
])
def test_malformed_bodies_are_422_with_a_message(client, content, headers, words):
    r = client.post("/v1/tasks/a/predict", content=content, headers=headers)
    assert r.status_code == 422, r.text
    assert words in r.json()["detail"], r.json()
    assert client.get("/health").json()["status"] == "ok"


def test_limits_are_413_naming_the_limit(client):
    r = post(client, "a", {"inputs": ["x"] * 5})
    assert r.status_code == 413
    assert "too many inputs: 5" in r.json()["detail"] and "at most 4" in r.json()["detail"]
    r = post(client, "a", {"inputs": ["ok", "x" * 11]})
    assert r.status_code == 413
    assert "inputs[1] is 11 characters long" in r.json()["detail"] and "at most 10" in r.json()["detail"]
    r = client.post("/v1/tasks/a/predict", content=b" " * 2_000_000, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "request body too large" in r.json()["detail"]
    assert client.runtime.batches == []  # nothing over a limit reached the model


def test_a_failing_request_fails_alone_with_500(client):
    assert post(client, "a", {"inputs": ["boom"]}).status_code == 500
    assert "the model exploded" in post(client, "a", {"inputs": ["boom"]}).json()["detail"]
    assert post(client, "a", {"inputs": ["fine"]}).status_code == 200


def test_concurrent_http_requests_share_batches_and_get_their_own_answers():
    rt = FakeRuntime()
    app = create_app(rt, max_batch=32, batch_wait_ms=300)
    jobs = [(["a", "b", "emb"][i % 3], [f"r{i}-{j}" for j in range(1 + i % 2)]) for i in range(9)]
    with TestClient(app) as c, ThreadPoolExecutor(9) as pool:
        answers = list(pool.map(lambda j: post(c, j[0], {"inputs": j[1]}).json(), jobs))
    for (task, inputs), answer in zip(jobs, answers):
        assert answer == {"task": task, "outputs": [FakeRuntime._one(task, x) for x in inputs]}
    assert len(rt.batches) < len(jobs)  # some requests shared a forward pass
    assert any(len({t for t, _ in b}) > 1 for b in rt.batches)  # ... across tasks


def test_after_shutdown_requests_get_503():
    app = create_app(FakeRuntime())
    with TestClient(app) as c:
        assert post(c, "a", {"inputs": ["x"]}).status_code == 200
    c = TestClient(app)  # no lifespan: the batcher stopped with the last one
    assert c.get("/health").status_code == 503
    r = post(c, "a", {"inputs": ["x"]})
    assert r.status_code == 503 and "shutting down" in r.json()["detail"]


# ------------------------------------------------------------------------------ the batcher alone


def test_batcher_mixes_tasks_in_arrival_order_and_splits_big_requests():
    async def go():
        rt = FakeRuntime()
        b = Batcher(rt.predict_mixed, max_batch=4, wait_s=0.05)
        b.start()
        results = await asyncio.gather(
            b.submit("a", ["1", "2"]), b.submit("emb", ["xyz"]), b.submit("b", ["3", "4", "5"]))
        await b.close()
        return rt, results

    rt, (ra, remb, rb) = asyncio.run(go())
    assert ra == [FakeRuntime._one("a", "1"), FakeRuntime._one("a", "2")]
    assert remb == [{"embedding": [3.0, 0.5]}]
    assert rb == [FakeRuntime._one("b", x) for x in "345"]
    # 6 inputs, max_batch 4: the first pass fills up in arrival order, the third request spanning two
    assert rt.batches == [[("a", "1"), ("a", "2"), ("emb", "xyz"), ("b", "3")], [("b", "4"), ("b", "5")]]


def test_batcher_isolates_a_failing_request():
    async def go():
        rt = FakeRuntime()
        b = Batcher(rt.predict_mixed, max_batch=8, wait_s=0.05)
        b.start()
        out = await asyncio.gather(b.submit("a", ["ok"]), b.submit("a", ["boom"]), b.submit("b", ["fine"]),
                                   return_exceptions=True)
        await b.close()
        return out

    good, bad, fine = asyncio.run(go())
    assert good == [FakeRuntime._one("a", "ok")] and fine == [FakeRuntime._one("b", "fine")]
    assert isinstance(bad, RuntimeError)


def test_batcher_close_finishes_the_batch_in_flight_and_refuses_the_rest():
    gate = threading.Event()

    async def go():
        rt = FakeRuntime(gate)
        b = Batcher(rt.predict_mixed, max_batch=1, wait_s=0)
        b.start()
        first = asyncio.ensure_future(b.submit("a", ["first"]))
        while not rt.batches:  # the first batch is in the model, blocked on the gate
            await asyncio.sleep(0.01)
        second = asyncio.ensure_future(b.submit("a", ["second"]))
        await asyncio.sleep(0.01)
        closing = asyncio.ensure_future(b.close())
        await asyncio.sleep(0.05)
        assert not first.done()  # close() waits for the batch in flight
        gate.set()
        await closing
        late = None
        try:
            await b.submit("a", ["late"])
        except ShuttingDown as e:
            late = e
        return rt, await first, await asyncio.gather(second, return_exceptions=True), late

    t0 = time.monotonic()
    rt, first, (second,), late = asyncio.run(go())
    assert time.monotonic() - t0 < 10
    assert first == [FakeRuntime._one("a", "first")]
    assert isinstance(second, ShuttingDown) and isinstance(late, ShuttingDown)
    assert rt.batches == [[("a", "first")]]


def test_cli_without_the_serve_extra_says_how_to_install_it(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from flexmerge.cli import app

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn -> ImportError
    result = CliRunner().invoke(app, ["serve", str(tmp_path)])
    assert result.exit_code == 2
    assert "pip install 'flexmerge[serve]'" in result.output


def test_a_body_of_many_bad_values_gets_a_short_answer(client):
    """Thousands of invalid inputs or unknown fields: validation stops at the first bad input and
    names a few unknown fields in one error, never a list of them all (a 1.6 MB body of integers
    once got a 71 MB answer; once bounded, its validation still held the event loop for 5 s)."""
    app = create_app(FakeRuntime(), max_inputs=4096, max_chars=10, max_batch=3, batch_wait_ms=1)
    with TestClient(app) as c:
        r = post(c, "a", {"inputs": list(range(4000))})
        assert r.status_code == 422
        assert r.json()["errors"] == [{"type": "string_type", "loc": ["body", "inputs", 0],
                                       "msg": "Input should be a valid string"}]
        r = post(c, "a", {"inputs": ["x"], **{f"k{i}": 0 for i in range(40_000)}})
        assert r.status_code == 422
        assert len(r.json()["errors"]) == 1 and len(r.content) < 1000
        assert ("body: unknown field 'k0', 'k1', 'k2', 'k3', 'k4' and 39995 more; the body takes 'inputs'"
                in r.json()["detail"])


@pytest.mark.parametrize("flags,message", [
    (dict(batch_wait_ms=float("inf")), "--batch-wait-ms must be from 0 to 10000 milliseconds, got inf"),
    (dict(batch_wait_ms=float("nan")), "--batch-wait-ms must be from 0 to 10000"),
    (dict(batch_wait_ms=1e308), "--batch-wait-ms must be from 0 to 10000"),
    (dict(batch_wait_ms=-1), "--batch-wait-ms must be from 0 to 10000"),
    (dict(max_batch=0), "--max-batch must be a whole number from 1 to 4096, got 0"),
    (dict(max_inputs=10**9), "--max-inputs must be a whole number from 1 to 4096"),
])
def test_server_limits_are_finite_and_bounded(flags, message):
    from flexmerge.errors import ConfigError

    options = dict(max_inputs=4, max_chars=10, max_batch=3, batch_wait_ms=1) | flags
    with pytest.raises(ConfigError, match=message.replace("(", "\\(")):
        create_app(FakeRuntime(), **options)


def test_a_lone_surrogate_is_a_422_not_a_500(client):
    r = client.post("/v1/tasks/a/predict", content=b'{"inputs": ["ok", "\\ud800"]}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert "inputs[1] is not valid Unicode text" in r.json()["detail"]
    assert client.runtime.batches == []  # nothing reached the model
