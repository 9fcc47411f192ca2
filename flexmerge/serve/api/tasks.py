"""The task API: GET /tasks (what the artifact serves) and POST /v1/tasks/{task}/predict with
{"inputs": [...]} (labels and scores, or embeddings, of one task). Errors are JSON
{"detail": "..."}: 404 unknown task, 413 over a limit, 500 a failed prediction (the server keeps
running), 503 shutting down; a malformed body is the app's 422 (`flexmerge.serve.server`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import Field, StrictStr, field_validator

from flexmerge.errors import FlexMergeError
from flexmerge.serve.api.body import StrictBody
from flexmerge.serve.batcher import ShuttingDown, running_batcher

__all__ = ["PredictRequest", "RuntimeLike", "router"]

log = logging.getLogger("flexmerge.serve")


class RuntimeLike(Protocol):
    """What the server needs of `flexmerge.runtime.Runtime` (a fake one serves in unit tests)."""

    tasks: list[str]
    size: float

    def task_info(self, task: str) -> dict[str, Any]: ...

    def predict_mixed(self, items: list[tuple[str, str]]) -> list[dict[str, Any]]: ...


class PredictRequest(StrictBody):
    """The body of POST /v1/tasks/{task}/predict. Unknown fields are refused so that a typo
    (`"input"`) is an error and not an empty request."""

    inputs: list[StrictStr] = Field(min_length=1, fail_fast=True, description="texts to run through the task's model")

    @field_validator("inputs")
    @classmethod
    def _unicode_text(cls, inputs: list[str]) -> list[str]:
        """JSON may carry lone surrogates (\\ud800) that no tokenizer can encode: refused here, 422."""
        for i, text in enumerate(inputs):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"inputs[{i}] is not valid Unicode text (a lone surrogate)") from None
        return inputs


def router(runtime: RuntimeLike, *, max_inputs: int, max_chars: int) -> APIRouter:
    """The task API over `runtime`: requests of at most `max_inputs` inputs of at most `max_chars`
    characters. Task infos are read once here: they are fixed for the artifact's lifetime."""
    tasks = list(runtime.tasks)
    infos = [runtime.task_info(t) for t in tasks]
    api = APIRouter()

    @api.get("/tasks")
    async def list_tasks() -> dict[str, Any]:
        return {"size": float(runtime.size), "tasks": infos}

    @api.post("/v1/tasks/{task}/predict")
    async def predict(task: str, body: PredictRequest, request: Request) -> JSONResponse:
        """Run `inputs` through `task`'s model: labels and scores, or embeddings."""
        if task not in tasks:
            raise HTTPException(404, _unknown_task(task, tasks))
        _check_limits(body.inputs, max_inputs, max_chars)
        batcher = running_batcher(request.app.state)
        if batcher is None:
            raise HTTPException(503, "the server is shutting down")
        try:
            outputs = await batcher.submit(task, body.inputs)
        except ShuttingDown:
            raise HTTPException(503, "the server is shutting down; the request was not run") from None
        except FlexMergeError as e:
            status = 404 if str(e).startswith("unknown task") else 422
            raise HTTPException(status, str(e)) from None
        except Exception as e:
            log.exception("prediction failed for task %r", task)
            raise HTTPException(500, f"prediction failed: {type(e).__name__}: {e}") from None
        return JSONResponse({"task": task, "outputs": outputs})

    return api


def _check_limits(inputs: list[str], max_inputs: int, max_chars: int) -> None:
    if len(inputs) > max_inputs:
        raise HTTPException(413, f"too many inputs: {len(inputs)}; this server takes at most {max_inputs} "
                                 "per request (--max-inputs)")
    for i, text in enumerate(inputs):
        if len(text) > max_chars:
            raise HTTPException(413, f"inputs[{i}] is {len(text)} characters long; this server takes at most "
                                     f"{max_chars} per input (--max-chars)")


def _unknown_task(task: str, tasks: Sequence[str]) -> str:
    return f"unknown task {task!r}; this model serves: {', '.join(tasks)}"
