"""GET /health: liveness for load balancers, whatever APIs the server carries."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from flexmerge.serve.batcher import running_batcher


def router(task_count: int) -> APIRouter:
    """The health endpoint of a server of `task_count` tasks."""
    api = APIRouter()

    @api.get("/health")
    async def health(request: Request) -> JSONResponse:
        """Liveness for load balancers: 503 once the server is stopping."""
        if running_batcher(request.app.state) is None:
            return JSONResponse({"status": "stopping", "tasks": task_count}, status_code=503)
        return JSONResponse({"status": "ok", "tasks": task_count})

    return api
