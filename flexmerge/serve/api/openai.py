"""The OpenAI API, for the text-generation tasks (causal LMs) of an artifact: `model` names the task.

GET /v1/models (and /v1/models/{model}), POST /v1/completions, POST /v1/chat/completions (the
task's chat template). Parameters: max_tokens (max_completion_tokens in chat), temperature, top_p,
seed, stop, n (1 only), stream (server-sent events in OpenAI's chunk format, ending with
`data: [DONE]`; stream_options.include_usage adds a last chunk with the usage), user (ignored).
Parameters this server does not implement (logprobs, echo, penalties, tools, ...) are refused with
400 unless they carry their neutral value, and so is any field OpenAI does not define.

Every error on these routes has OpenAI's body {"error": {"message", "type", "param", "code"}}:
400 a bad request (code `context_length_exceeded` when the prompt and max_tokens do not fit the
model), 404 an unknown model (`model_not_found`), 413 a prompt over the server's limits, 500 a
failed generation, 503 shutting down. Requests of any tasks decode together
(`flexmerge.serve.decoder`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from flexmerge.errors import ConfigError
from flexmerge.serve.api.body import StrictBody
from flexmerge.runtime.generation import ContextLengthError, Sampling, TaskDecoding, Update
from flexmerge.serve.batcher import ShuttingDown
from flexmerge.serve.decoder import DecodeLoop, running_decoder

__all__ = ["ChatRequest", "CompletionRequest", "OpenAIError", "PATHS", "error_body", "owns", "router"]

log = logging.getLogger("flexmerge.serve")

PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions")
MAX_STOP = 4  # stop sequences per request, as OpenAI allows
MAX_STOP_CHARS = 256  # characters of one stop sequence: the text is searched for it at every token
COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_ERRORS_SHOWN = 3
Number = StrictInt | StrictFloat
# list fields stop at their first invalid element (serve/api/body.py): a hostile body costs what
# the limits allow, not one error object per element
Texts = Annotated[list[StrictStr], Field(fail_fast=True)]
TokenIds = Annotated[list[StrictInt], Field(fail_fast=True)]
TokenIdLists = Annotated[list[TokenIds], Field(fail_fast=True)]


def owns(path: str) -> bool:
    """Whether `path` is one of this API's (its errors then take OpenAI's body)."""
    return any(path == p or path.startswith(p + "/") for p in PATHS)


def error_body(message: str, *, type: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class OpenAIError(Exception):
    """An error answered with OpenAI's body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type=type, code=code, param=param)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status)


class GeneratingRuntime(Protocol):
    """What this API needs of `flexmerge.runtime.Runtime`."""

    def encode_prompt(self, task: str, text: str) -> list[int]: ...

    def encode_chat(self, task: str, messages: Sequence[dict[str, Any]]) -> list[int]: ...

    def decoding(self, task: str) -> TaskDecoding: ...


# ------------------------------------------------------------------------------------ the bodies


class _Body(StrictBody):
    """What completions and chat share. A field OpenAI does not define is refused (a typo is an
    error, not a silent default); fields this server does not implement must be neutral."""

    model: StrictStr
    max_tokens: StrictInt | None = None
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, ge=0, le=1)
    n: StrictInt | None = None
    stream: StrictBool | None = False
    stream_options: dict[str, Any] | None = None
    stop: StrictStr | Texts | None = None
    seed: StrictInt | None = None
    user: StrictStr | None = None
    # neither implemented nor ignorable: accepted only with their neutral value (`_NEUTRAL`)
    logprobs: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    best_of: Any = None


class CompletionRequest(_Body):
    """POST /v1/completions: `prompt` is a text, a list of texts (one choice each), token ids, or
    a list of token-id lists."""

    prompt: StrictStr | Texts | TokenIds | TokenIdLists
    echo: Any = None
    suffix: Any = None


class ChatMessage(BaseModel):
    """One message; `content` a text or a list of text parts ({"type": "text", "text": ...})."""

    model_config = ConfigDict(extra="allow")

    role: StrictStr
    content: StrictStr | Annotated[list[dict[str, Any]], Field(fail_fast=True)] | None = None
    name: StrictStr | None = None


class ChatRequest(_Body):
    """POST /v1/chat/completions: the messages, rendered by the task's chat template."""

    messages: list[ChatMessage] = Field(min_length=1, fail_fast=True)
    max_completion_tokens: StrictInt | None = None
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None  # ignored: there are no tools
    response_format: Any = None


_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "logit_bias": (None, {}), "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""),
    "top_logprobs": (None, 0), "tools": (None, []), "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


# ------------------------------------------------------------------------------------- the route


class _OpenAIRoute(APIRoute):
    """Errors of these routes in OpenAI's body: a body that does not validate is a 400 (OpenAI's
    status for a bad request), and an OpenAIError is answered as itself."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                return await handler(request)
            except RequestValidationError as e:
                return OpenAIError(400, _validation_message(e.errors())).response()
            except OpenAIError as e:
                return e.response()
        return route


def _validation_message(errors: Sequence[dict[str, Any]]) -> str:
    parts = []
    for e in errors[:MAX_ERRORS_SHOWN]:
        kind, loc = e.get("type", ""), [p for p in e.get("loc", ()) if p != "body"]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        if kind == "json_invalid":
            parts.append("the body is not valid JSON")
        elif kind == "extra_forbidden":
            parts.append(f"unrecognized request argument supplied: {where}")
        elif kind == "unknown_fields":  # serve/api/body.py: all of a body's unknown fields, as one error
            parts.append(f"unrecognized request argument supplied: {e.get('ctx', {}).get('fields', where)}")
        elif kind == "missing" and not where:
            parts.append("the body is missing: send a JSON object")
        else:
            parts.append(f"{where or 'body'}: {e.get('msg', kind)}")
    more = f"; and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
    return "invalid request: " + "; ".join(parts) + more


def router(runtime: GeneratingRuntime, infos: Sequence[dict[str, Any]], *, max_inputs: int, max_chars: int,
           max_tokens: int) -> APIRouter:
    """The OpenAI API over the text-generation tasks of `runtime` (`infos`: every task's
    task_info). Limits: at most `max_inputs` prompts per request, `max_chars` characters per
    prompt (a chat: all its messages), `max_tokens` new tokens per prompt."""
    generating = [i["task"] for i in infos if i["kind"] == "text-generation"]
    kinds = {i["task"]: i["kind"] for i in infos}
    created = int(time.time())
    api = APIRouter(route_class=_OpenAIRoute)

    def model_card(task: str) -> dict[str, Any]:
        return {"id": task, "object": "model", "created": created, "owned_by": "flexmerge"}

    @api.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        """The text-generation tasks, as model ids."""
        return {"object": "list", "data": [model_card(t) for t in generating]}

    @api.get("/v1/models/{model}")
    async def one_model(model: str) -> dict[str, Any]:
        _check_model(model, kinds)
        return model_card(model)

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        """Complete a prompt (or several: one choice each) with the task `model`."""
        _check_common(body, kinds, max_tokens)
        prompts = _completion_prompts(runtime, body, max_inputs, max_chars)
        budget = body.max_tokens if body.max_tokens is not None else COMPLETION_DEFAULT_TOKENS
        plan = [(p, _sampling(body, budget)) for p in prompts]
        return await _answer(request, body, plan, _CompletionFormat(body.model))

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        """The assistant's answer to `messages`, by the task `model`, through its chat template."""
        _check_common(body, kinds, max_tokens)
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise OpenAIError(400, "give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
        prompt = _chat_prompt(runtime, body, max_chars)
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if asked is None:  # as OpenAI: as long as the model's context allows (here, and this server's limit)
            context = runtime.decoding(body.model).context
            asked = max_tokens if context is None else max(1, min(max_tokens, context - len(prompt)))
        _check_budget(asked, max_tokens,
                      "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens")
        return await _answer(request, body, [(prompt, _sampling(body, asked))], _ChatFormat(body.model))

    return api


# ---------------------------------------------------------------------------------- the checks


def _check_model(model: str, kinds: dict[str, str]) -> None:
    if model not in kinds:
        raise OpenAIError(404, f"the model {model!r} does not exist; this server serves: "
                               f"{', '.join(t for t, k in kinds.items() if k == 'text-generation') or 'no text model'}",
                          code="model_not_found", param="model")
    if kinds[model] != "text-generation":
        raise OpenAIError(400, f"the model {model!r} is a {kinds[model]} task, not a causal LM: ask it with POST "
                               f"/v1/tasks/{model}/predict", code="model_not_supported", param="model")


def _check_common(body: _Body, kinds: dict[str, str], max_tokens: int) -> None:
    _check_model(body.model, kinds)
    for name, neutral in _NEUTRAL.items():
        value = getattr(body, name, None)
        if value not in neutral:
            raise OpenAIError(400, f"{name} is not supported by this server; send {json.dumps(neutral[-1])} or leave "
                                   "it out", param=name)
    if body.n is not None and body.n != 1:
        raise OpenAIError(400, f"n must be 1: this server generates one choice per prompt, got n={body.n}", param="n")
    if body.stream_options is not None and not body.stream:
        raise OpenAIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
    if len(stops) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise OpenAIError(400, f"stop takes at most {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} "
                               "characters", param="stop")
    if body.max_tokens is not None:
        _check_budget(body.max_tokens, max_tokens, "max_tokens")


def _check_budget(asked: int, most: int, param: str) -> None:
    if asked < 1:
        raise OpenAIError(400, f"{param} must be at least 1, got {asked}", param=param)
    if asked > most:
        raise OpenAIError(400, f"{param} is {asked}; this server generates at most {most} tokens per request "
                               "(--max-tokens)", param=param)


def _sampling(body: _Body, max_tokens: int) -> Sampling:
    stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
    try:
        return Sampling(max_tokens=max_tokens, temperature=1.0 if body.temperature is None else float(body.temperature),
                        top_p=1.0 if body.top_p is None else float(body.top_p), seed=body.seed, stop=tuple(stops))
    except ConfigError as e:
        raise OpenAIError(400, str(e)) from None


def _too_long(what: str, chars: int, most: int) -> OpenAIError:
    return OpenAIError(413, f"{what} is {chars} characters long; this server takes at most {most} (--max-chars)",
                       code="request_too_large", param="prompt" if what.startswith("prompt") else "messages")


def _completion_prompts(runtime: GeneratingRuntime, body: CompletionRequest, max_inputs: int,
                        max_chars: int) -> list[list[int]]:
    """The prompts as token ids: a text or a list of token ids is one prompt, a list of either many."""
    prompt = body.prompt
    many: list[str] | list[list[int]]
    if isinstance(prompt, str):
        many = [prompt]
    elif prompt and all(isinstance(x, int) for x in prompt):
        many = [prompt]  # type: ignore[list-item]
    else:
        many = prompt  # type: ignore[assignment]
    if not many:
        raise OpenAIError(400, "prompt is empty", param="prompt")
    if len(many) > max_inputs:
        raise OpenAIError(413, f"too many prompts: {len(many)}; this server takes at most {max_inputs} per request "
                               "(--max-inputs)", code="request_too_large", param="prompt")
    out = []
    for i, p in enumerate(many):
        where = "prompt" if len(many) == 1 else f"prompt[{i}]"
        if len(p) > max_chars:
            raise _too_long(where, len(p), max_chars) if isinstance(p, str) else OpenAIError(
                413, f"{where} is {len(p)} tokens long; this server takes at most {max_chars} (--max-chars)",
                code="request_too_large", param="prompt")
        ids = runtime.encode_prompt(body.model, p) if isinstance(p, str) else list(p)
        if not ids:
            raise OpenAIError(400, f"{where} has no tokens", param="prompt")
        out.append(ids)
    return out


def _chat_prompt(runtime: GeneratingRuntime, body: ChatRequest, max_chars: int) -> list[int]:
    messages = []
    for i, m in enumerate(body.messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise OpenAIError(400, f"messages[{i}]: only text content parts ({{\"type\": \"text\", \"text\": "
                                           f"...}}) are supported, got type {part.get('type')!r}", param="messages")
                texts.append(part["text"])
            content = "\n".join(texts)
        message = {"role": m.role, "content": content or ""}
        if m.name is not None:
            message["name"] = m.name
        messages.append(message)
    chars = sum(len(m["content"]) for m in messages)
    if chars > max_chars:
        raise _too_long("the messages' content", chars, max_chars)
    try:
        ids = runtime.encode_chat(body.model, messages)
    except ConfigError as e:
        raise OpenAIError(400, f"{e}; use /v1/completions with a prompt", param="messages") from None
    if not ids:
        raise OpenAIError(400, "the rendered messages have no tokens", param="messages")
    return ids


# -------------------------------------------------------------------------------------- answers


class _CompletionFormat:
    """The bodies of /v1/completions: `text_completion` objects and their chunks."""

    def __init__(self, model: str):
        self.model, self.id, self.created = model, f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def answer(self, texts: list[str], reasons: list[str], usage: dict[str, int]) -> dict[str, Any]:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        return {**self.envelope("text_completion"), "choices": choices, "usage": usage}

    def opening(self, index: int) -> list[dict[str, Any]]:
        return []

    def chunk(self, index: int, update: Update) -> dict[str, Any] | None:
        if not update.text and not update.finished:
            return None
        choice = {"index": index, "text": update.text, "logprobs": None, "finish_reason": update.finish_reason}
        return {**self.envelope("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self.envelope("text_completion"), "choices": [], "usage": usage}


class _ChatFormat(_CompletionFormat):
    """The bodies of /v1/chat/completions: `chat.completion` objects and `chat.completion.chunk`s."""

    def __init__(self, model: str):
        super().__init__(model)
        self.id = f"chatcmpl-{uuid.uuid4().hex}"

    def answer(self, texts: list[str], reasons: list[str], usage: dict[str, int]) -> dict[str, Any]:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        return {**self.envelope("chat.completion"), "choices": choices, "usage": usage}

    def opening(self, index: int) -> list[dict[str, Any]]:
        choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}
        return [{**self.envelope("chat.completion.chunk"), "choices": [choice]}]

    def chunk(self, index: int, update: Update) -> dict[str, Any] | None:
        if not update.text and not update.finished:
            return None
        delta = {"content": update.text} if update.text else {}
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": update.finish_reason}
        return {**self.envelope("chat.completion.chunk"), "choices": [choice]}

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self.envelope("chat.completion.chunk"), "choices": [], "usage": usage}


def _usage(prompts: Sequence[Sequence[int]], produced: Sequence[int]) -> dict[str, int]:
    p, c = sum(map(len, prompts)), sum(produced)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _answer(request: Request, body: _Body, plan: list[tuple[list[int], Sampling]], fmt: _CompletionFormat):
    """Run the prompts; one JSON answer, or a stream of chunks. Errors before the first token are
    ordinary error responses; after it, a stream ends with an error event and `[DONE]`."""
    decoder = running_decoder(request.app.state)
    if decoder is None:
        raise OpenAIError(503, "the server is shutting down", type="server_error", code="service_unavailable")
    events = _merged(decoder, body.model, plan)
    try:
        first = await anext(events)  # errors before any token get their status code
    except Exception as e:
        await events.aclose()
        raise _as_openai(e, body.model) from None
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(_sse(first, events, fmt, plan, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    texts, reasons, produced = [""] * len(plan), [""] * len(plan), [0] * len(plan)
    try:
        item: tuple[int, Update] | None = first
        while item is not None:
            index, update = item
            texts[index] += update.text
            produced[index] = update.tokens
            if update.finished:
                reasons[index] = update.finish_reason or ""
            item = await anext(events, None)
    except Exception as e:
        raise _as_openai(e, body.model) from None
    finally:
        await events.aclose()
    return JSONResponse(fmt.answer(texts, reasons, _usage([p for p, _ in plan], produced)))


async def _sse(first: tuple[int, Update], events: AsyncIterator[tuple[int, Update]], fmt: _CompletionFormat,
               plan: list[tuple[list[int], Sampling]], include_usage: bool) -> AsyncIterator[bytes]:
    produced = [0] * len(plan)
    opened: set[int] = set()
    try:
        item: tuple[int, Update] | None = first
        while item is not None:
            index, update = item
            produced[index] = update.tokens
            chunks = fmt.opening(index) if index not in opened else []
            opened.add(index)
            chunk = fmt.chunk(index, update)
            for c in [*chunks, *([chunk] if chunk is not None else [])]:
                if include_usage:
                    c["usage"] = None
                yield _event(c)
            item = await anext(events, None)
        if include_usage:
            yield _event(fmt.usage_chunk(_usage([p for p, _ in plan], produced)))
    except Exception as e:
        yield _event(_as_openai(e, fmt.model).body)
    finally:
        await events.aclose()
    yield b"data: [DONE]\n\n"


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def _merged(decoder: DecodeLoop, task: str, plan: list[tuple[list[int], Sampling]]
                  ) -> AsyncIterator[tuple[int, Update]]:
    """(prompt index, update) of every prompt, as they come; one prompt needs no merging."""
    if len(plan) == 1:
        async for update in decoder.generate(task, *plan[0]):
            yield 0, update
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, prompt: list[int], sampling: Sampling) -> None:
        try:
            async for update in decoder.generate(task, prompt, sampling):
                queue.put_nowait((index, update))
        except Exception as e:
            queue.put_nowait(e)

    pumps = [asyncio.create_task(pump(i, p, s)) for i, (p, s) in enumerate(plan)]
    try:
        left = len(plan)
        while left:
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            left -= item[1].finished
            yield item
    finally:
        for p in pumps:
            p.cancel()


def _as_openai(e: BaseException, model: str) -> OpenAIError:
    if isinstance(e, OpenAIError):
        return e
    if isinstance(e, ShuttingDown):
        return OpenAIError(503, "the server is shutting down; the request was not completed", type="server_error",
                           code="service_unavailable")
    if isinstance(e, ContextLengthError):
        return OpenAIError(400, str(e), code="context_length_exceeded", param="max_tokens")
    if isinstance(e, ConfigError):
        return OpenAIError(400, str(e))
    log.error("generation failed for model %r: %s: %s", model, type(e).__name__, e)
    return OpenAIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")

