"""The server's decode loop and OpenAI routes against a scripted generator: a failing step fails
the requests in flight (500) and the next ones are served; a client that leaves a stream cancels
its sequence; a stopping server answers 503. Fast: no model, no server process."""

from __future__ import annotations

import asyncio
import threading

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from flexmerge.errors import ConfigError  # noqa: E402
from flexmerge.runtime.generation import Generation, Sampling, TaskDecoding  # noqa: E402
from flexmerge.serve.server import create_app  # noqa: E402

BOOM = 666  # a prompt holding this token id makes the step fail


class ScriptedGenerator:
    """The Generator contract: every step gives each running sequence token 7 (no text); a step
    with a BOOM prompt in flight raises."""

    def __init__(self):
        self.running: list[Generation] = []
        self.cancelled: list[Generation] = []
        self.steps = 0
        self.lock = threading.Lock()

    def submit(self, task, prompt, sampling):
        if task != "lm":
            raise ConfigError(f"unknown task {task!r}")
        g = Generation(task, prompt, sampling, TaskDecoding(None, ()))
        with self.lock:
            self.running.append(g)
        return g

    @staticmethod
    def cancel(g):
        g.cancelled = True

    @property
    def busy(self):
        return bool(self.running)

    def step(self):
        with self.lock:
            self.cancelled += [g for g in self.running if g.cancelled]
            self.running = [g for g in self.running if not g.cancelled]
            batch = list(self.running)
        self.steps += 1
        threading.Event().wait(0.005)  # a step takes a while, as a model's does
        if any(BOOM in g.prompt for g in batch):
            raise RuntimeError("the model exploded")
        updates = [g.push(7) for g in batch]
        with self.lock:
            self.running = [g for g in self.running if not g.finished]
        return updates

    def abort(self):
        with self.lock:
            dropped, self.running = self.running, []
        return dropped


class FakeRuntime:
    tasks = ["lm"]
    size = 1.0

    def __init__(self):
        self.engine = ScriptedGenerator()

    def task_info(self, task):
        return {"task": task, "kind": "text-generation", "labels": None}

    def predict_mixed(self, items):
        raise AssertionError("not called")

    def generator(self, *, max_batch, join):
        return self.engine

    def decoding(self, task):
        return TaskDecoding(None, (), context=10_000)

    def encode_prompt(self, task, text):
        return [BOOM] if text == "boom" else [1, 2, 3]

    def encode_chat(self, task, messages):
        return [1, 2]


@pytest.fixture
def client():
    rt = FakeRuntime()
    with TestClient(create_app(rt, batch_wait_ms=0)) as c:
        c.runtime = rt
        yield c


def test_a_failing_step_fails_the_requests_in_flight_and_the_next_are_served(client):
    r = client.post("/v1/completions", json={"model": "lm", "prompt": "boom", "max_tokens": 3})
    assert r.status_code == 500
    assert r.json()["error"] == {"message": "generation failed: RuntimeError: the model exploded",
                                 "type": "server_error", "param": None, "code": None}
    r = client.post("/v1/completions", json={"model": "lm", "prompt": "fine", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"] == {"prompt_tokens": 3, "completion_tokens": 3,
                                                          "total_tokens": 6}
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_a_request_that_leaves_cancels_its_sequence():
    """Leaving the stream of updates early (what Starlette does to a streaming response whose
    client has gone) cancels the sequence: it leaves the batch at the next step."""
    from flexmerge.serve.decoder import DecodeLoop

    async def scenario():
        engine = ScriptedGenerator()
        loop = DecodeLoop(engine, wait_s=0)
        loop.start()
        updates = loop.generate("lm", [1, 2], Sampling(max_tokens=900))
        first = await anext(updates)
        await updates.aclose()
        for _ in range(100):
            if engine.cancelled:
                break
            await asyncio.sleep(0.01)
        await loop.close()
        return first, engine

    first, engine = asyncio.run(scenario())
    (gone,) = engine.cancelled
    assert first.tokens == 1 and 1 <= len(gone.tokens) < 900 and not gone.finished and not engine.running


def test_past_its_deadline_the_decode_loop_stops_and_requests_get_503(client):
    """As at SIGTERM (`stop_by`, the bounded shutdown): no step after the deadline; new requests
    get OpenAI's 503."""
    decoder = client.app.state.decoder
    client.portal.call(lambda: decoder.stop_by(asyncio.get_running_loop().time()))
    for _ in range(200):
        if not decoder.running:
            break
        threading.Event().wait(0.01)
    r = client.post("/v1/chat/completions", json={"model": "lm", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"


def test_models_lists_only_text_generation_tasks_and_sampling_is_checked(client):
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["lm"]
    r = client.post("/v1/completions", json={"model": "lm", "prompt": "x", "top_p": 1.5})
    assert r.status_code == 400 and "top_p: Input should be less than or equal to 1" in r.json()["error"]["message"]
    assert Sampling(top_p=0).top_p == 0  # top_p 0: the most likely token only
