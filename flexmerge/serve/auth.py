"""An optional API key for the whole server: with one set, every request but the health check must
carry `Authorization: Bearer <key>` (the OpenAI clients' header), else it is refused with 401
before its body is read. The key is compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from fastapi.responses import JSONResponse

__all__ = ["APIKey"]


class APIKey:
    """ASGI middleware: requests without the bearer `key` are answered 401, with the body that
    `error_body(path, message)` gives (each API family its own format); `open_paths` need no key."""

    def __init__(self, app: Callable, key: str, error_body: Callable[[str, str], dict],
                 open_paths: tuple[str, ...] = ("/health",)):
        self.app = app
        self.key = key.encode()
        self.error_body = error_body
        self.open_paths = open_paths

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization")
        scheme, _, token = (header or b"").partition(b" ")
        if header is None or scheme.lower() != b"bearer":
            message = "no API key: send the header 'Authorization: Bearer <key>'"
        elif not hmac.compare_digest(token.strip(), self.key):
            message = "incorrect API key"
        else:
            await self.app(scope, receive, send)
            return
        body = self.error_body(scope["path"], message)
        await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
