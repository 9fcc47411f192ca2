"""`flexmerge serve` on a causal-LM artifact, driven by the official `openai` client: the real server
process (API key from FLEXMERGE_API_KEY) on a 2x merge of three tiny Llama fine-tunes. Completions,
chat (the task's template) and streams equal each task's exported model's `generate`, concurrent
requests of different tasks included; errors are OpenAI's, with the status codes its client maps."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pydantic
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import flexmerge  # noqa: E402
from flexmerge.serve.api.openai import ChatRequest, CompletionRequest  # noqa: E402
from tests.conftest import write_llama_zoo  # noqa: E402
from tests.test_serve_http import MAX_CHARS, Server, _free_port  # noqa: E402

KEY = "test-key-123"
MAX_TOKENS = 24  # the server's --max-tokens
TASKS = ("copy", "rev", "next")  # only `next` has a chat template
PROMPTS = [("copy", "copy a b c ="), ("rev", "rev a b ="), ("next", "next a b c d e f"), ("copy", "copy a"),
           ("rev", "rev g h a b c d e f = . a b"), ("next", "next a"), ("copy", "b c"), ("rev", "rev c d e f g h a =")]
CHAT = [{"role": "system", "content": "next"}, {"role": "user", "content": "next a b c"}]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """The 2x artifact and, per task, its export loaded the ordinary way (model, tokenizer)."""
    root = tmp_path_factory.mktemp("openai")
    base, dirs = write_llama_zoo(root)
    out = root / "flex-2x"
    flexmerge.merge_to_disk(flexmerge.load_tasks(base, dirs), out, size=2.0)
    refs = {}
    for task in TASKS:
        path = flexmerge.export(flexmerge.load(out), task, root / f"export-{task}")
        refs[task] = (transformers.AutoModelForCausalLM.from_pretrained(path).eval(),
                      transformers.AutoTokenizer.from_pretrained(path))
    return out, refs


@pytest.fixture(scope="module")
def server(llm, tmp_path_factory):
    s = Server(llm[0], _free_port(), tmp_path_factory.mktemp("openai-log") / "server.log", "--max-tokens",
               str(MAX_TOKENS), env={"FLEXMERGE_API_KEY": KEY})
    with s.running():
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def _reference(llm, task: str, prompt_ids: list[int], max_tokens: int) -> tuple[str, int, str]:
    """(text, completion tokens, finish reason) of the task's export: `generate`, greedy, alone; the
    text is what follows the prompt's text in the decoded prompt + completion (EOS not in it)."""
    model, tok = llm[1][task]
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=2)[0, len(prompt_ids):].tolist()
    ended = new[-1] == tok.eos_token_id
    text = tok.decode(prompt_ids + new[:len(new) - ended], skip_special_tokens=True)
    return text[len(tok.decode(prompt_ids, skip_special_tokens=True)):], len(new), "stop" if ended else "length"


def _prompt_ids(llm, task: str, text: str) -> list[int]:
    return llm[1][task][1](text)["input_ids"]


def _chat_ids(llm, task: str, messages: list[dict]) -> list[int]:
    tok = llm[1][task][1]
    return tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"]


def _raw(url: str, body: dict | None = None, key: str | None = None) -> tuple[int, str]:
    """(status, body text) of one request with or without the bearer key."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), headers=headers,
                                 method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_models_are_the_tasks(client):
    assert [m.id for m in client.models.list().data] == list(TASKS)
    assert client.models.retrieve("rev").id == "rev"


def test_completions_equal_generate(client, llm):
    for task, text in PROMPTS[:4]:
        got = client.completions.create(model=task, prompt=text, max_tokens=12, temperature=0)
        want, count, reason = _reference(llm, task, _prompt_ids(llm, task, text), 12)
        assert got.model == task and got.object == "text_completion"
        assert (got.choices[0].text, got.choices[0].finish_reason) == (want, reason)
        prompt_tokens = len(_prompt_ids(llm, task, text))
        assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == (
            prompt_tokens, count, prompt_tokens + count)


def test_concurrent_requests_of_different_tasks_equal_generate(client, llm):
    jobs = [(task, text, 6 + i % 7) for i, (task, text) in enumerate(PROMPTS * 2)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda j: client.completions.create(model=j[0], prompt=j[1], max_tokens=j[2],
                                                                    temperature=0), jobs))
    for (task, text, n), got in zip(jobs, answers):
        assert got.choices[0].text == _reference(llm, task, _prompt_ids(llm, task, text), n)[0], (task, text)


def test_chat_renders_the_tasks_template(client, llm):
    got = client.chat.completions.create(model="next", messages=CHAT, max_tokens=10, temperature=0)
    want, count, reason = _reference(llm, "next", _chat_ids(llm, "next", CHAT), 10)
    assert got.object == "chat.completion" and got.choices[0].message.role == "assistant"
    assert (got.choices[0].message.content, got.choices[0].finish_reason) == (want, reason)
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(_chat_ids(llm, "next", CHAT)), count)
    # without max_tokens: as long as the context and --max-tokens allow
    longest = client.chat.completions.create(model="next", messages=CHAT, temperature=0)
    assert longest.choices[0].message.content == _reference(llm, "next", _chat_ids(llm, "next", CHAT), MAX_TOKENS)[0]


def test_streams_carry_the_same_text_in_chunks(client, server, llm):
    task, text = PROMPTS[4]
    whole = client.completions.create(model=task, prompt=text, max_tokens=14, temperature=0)
    chunks = list(client.completions.create(model=task, prompt=text, max_tokens=14, temperature=0, stream=True))
    assert len(chunks) > 3 and "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    stream = list(client.chat.completions.create(model="next", messages=CHAT, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
        _reference(llm, "next", _chat_ids(llm, "next", CHAT), 10)[0]
    assert stream[-1].choices == [] and stream[-1].usage.completion_tokens == 10
    status, raw = _raw(server.url + "/v1/completions", {"model": "rev", "prompt": "rev a =", "max_tokens": 3,
                                                         "stream": True}, KEY)
    events = [line for line in raw.split("\n\n") if line]
    assert status == 200 and events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])


def test_seed_repeats_and_stop_cuts(client):
    kw = dict(model="copy", prompt="copy a b c =", max_tokens=12, temperature=1.0, top_p=0.9)
    one, two = (client.completions.create(seed=7, **kw).choices[0].text for _ in range(2))
    assert one == two
    greedy = client.completions.create(model="rev", prompt="rev a b =", max_tokens=12, temperature=0).choices[0].text
    stop = " ".join(greedy.split()[1:3])
    cut = client.completions.create(model="rev", prompt="rev a b =", max_tokens=12, temperature=0, stop=["zz", stop])
    assert cut.choices[0].text == greedy[:greedy.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_several_prompts_are_several_choices(client, llm):
    texts = [text for _, text in PROMPTS[:3]]
    got = client.completions.create(model="copy", prompt=texts, max_tokens=5, temperature=0)
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert [c.text for c in got.choices] == [_reference(llm, "copy", _prompt_ids(llm, "copy", t), 5)[0] for t in texts]


@pytest.mark.parametrize("call, error, status, code, words", [
    (dict(model="nope", prompt="a"), openai.NotFoundError, 404, "model_not_found", "the model 'nope' does not exist"),
    (dict(model="copy", prompt="a", n=2), openai.BadRequestError, 400, None, "n must be 1"),
    (dict(model="copy", prompt="a " * 45, max_tokens=20), openai.BadRequestError, 400, "context_length_exceeded",
     "maximum context length is 64 tokens; the prompt has 46"),
    (dict(model="copy", prompt="a", max_tokens=MAX_TOKENS + 1), openai.BadRequestError, 400, None,
     f"this server generates at most {MAX_TOKENS} tokens per request"),
    (dict(model="copy", prompt="a " * MAX_CHARS), openai.APIStatusError, 413, "request_too_large",
     f"at most {MAX_CHARS} (--max-chars)"),
    (dict(model="copy", prompt="a", extra_body={"colour": "red"}), openai.BadRequestError, 400, None,
     "unrecognized request argument supplied: colour"),
    (dict(model="copy", prompt="a", temperature=3), openai.BadRequestError, 400, None,
     "temperature: Input should be less than or equal to 2"),
    (dict(model="copy", prompt="a", logprobs=2), openai.BadRequestError, 400, None, "logprobs is not supported"),
    (dict(model="copy", prompt="a", seed=2**64), openai.BadRequestError, 400, None, "seed must be a 64-bit integer"),
    (dict(model="copy", prompt=[1, 12, 999]), openai.BadRequestError, 400, None,
     "token id 999, which is not in the model's vocabulary (0 to 21)"),
])
def test_errors_are_openais(client, call, error, status, code, words):
    with pytest.raises(error) as caught:
        client.completions.create(**call)
    assert caught.value.status_code == status and words in caught.value.message, caught.value.message
    assert set(caught.value.body) == {"message", "type", "param", "code"}  # the client's view of {"error": {...}}
    assert (caught.value.type, caught.value.code) == ("invalid_request_error", code)


def test_chat_without_a_template_is_a_400(client):
    with pytest.raises(openai.BadRequestError, match="task 'copy': its tokenizer has no chat template"):
        client.chat.completions.create(model="copy", messages=CHAT)


def test_the_api_key_guards_every_endpoint_but_health(server):
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        wrong.models.list()
    assert _raw(server.url + "/health")[0] == 200
    status, body = _raw(server.url + "/v1/completions", {"model": "copy", "prompt": "a"})
    assert status == 401 and json.loads(body)["error"]["message"].startswith("no API key")
    status, body = _raw(server.url + "/tasks")
    assert status == 401 and "Authorization: Bearer" in json.loads(body)["detail"]
    assert _raw(server.url + "/v1/tasks/copy/predict", {"inputs": ["a"]}, "wrong")[0] == 401
    status, body = _raw(server.url + "/tasks", key=KEY)
    assert status == 200 and [t["kind"] for t in json.loads(body)["tasks"]] == ["text-generation"] * 3
    status, body = _raw(server.url + "/v1/tasks/copy/predict", {"inputs": ["a"]}, KEY)
    assert status == 422 and "is a causal LM: it generates text" in json.loads(body)["detail"]


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"model": "copy", "prompt": [{}] * 20_000}),
    ("/v1/completions", {"model": "copy", "prompt": [[{}]] * 10_000}),
    ("/v1/completions", {"model": "copy", "prompt": "a", "stop": [0] * 20_000}),
    ("/v1/chat/completions", {"model": "next", "messages": [0] * 20_000}),
], ids=["prompt", "prompt-ids", "stop", "messages"])
def test_a_body_of_many_bad_elements_is_refused_quickly_and_briefly(server, path, body):
    """Validation stops at a list's first bad element (issue 30's 800k-integer body): a handful of
    errors, not one per element (before: 3 per element of `prompt`), a small quick answer, and the
    server keeps answering others."""
    model = ChatRequest if "messages" in body else CompletionRequest
    with pytest.raises(pydantic.ValidationError) as caught:
        model.model_validate(body)
    assert len(caught.value.errors()) <= 5
    started = time.monotonic()
    status, text = _raw(server.url + path, body, KEY)
    assert status == 400 and len(text) < 4000, text[:300]
    assert time.monotonic() - started < 5
    assert _raw(server.url + "/health")[0] == 200


def test_sigterm_stops_the_server_cleanly(server):
    server.proc.send_signal(signal.SIGTERM)
    try:
        assert server.proc.wait(15) == 0, server.output()
    except subprocess.TimeoutExpired:
        pytest.fail(f"server still running 15 s after SIGTERM:\n{server.output()}")
    assert "Traceback" not in server.output() and "decoder stopped after" in server.output(), server.output()
