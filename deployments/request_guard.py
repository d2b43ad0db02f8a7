"""ASGI middleware in front of the OpenAI app: the API key, then the request body's size.

It runs before any routing or body parsing, so an unauthenticated or oversized request costs no JSON
parsing. Settings come from the ingress replica's servable object, which publishes them as
``guard_settings`` (the FastAPI app stays a module-level object, as ``serve.ingress`` requires).
If they cannot be read the request is refused with a 500: a broken lookup never turns authentication off.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse
from ray import serve
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.protocol import OpenAIError

logger = logging.getLogger("ray.serve")

# Paths answered without the API key (load balancers and Serve's own probes have no key).
PUBLIC_PATHS = frozenset({"/health"})


@dataclass(frozen=True)
class GuardSettings:
    """What ``RequestGuard`` enforces.

    Attributes:
        api_key: the key every non-public path requires as ``Authorization: Bearer <key>``; ``None`` = no auth.
        max_request_body_bytes: largest body accepted; larger ones get 413 before the app reads them.
    """

    api_key: str | None = field(repr=False)  # never shown in logs or reprs
    max_request_body_bytes: int


def replica_guard_settings() -> GuardSettings:
    """The settings of the ingress that this Serve replica runs; raises if there is none."""
    settings = serve.get_replica_context().servable_object.guard_settings
    if not isinstance(settings, GuardSettings):
        raise TypeError(f"the replica's guard_settings is a {type(settings).__name__}, not GuardSettings")
    return settings


class RequestGuard:
    """ASGI middleware: 401 without the API key (but on ``PUBLIC_PATHS``), 413 past the body limit.

    Args:
        app: the ASGI app behind the guard.
        settings: returns the settings to enforce, asked on every request; any exception it raises
            answers 500 (the default reads the Serve replica's ingress, see ``replica_guard_settings``).
    """

    def __init__(self, app: ASGIApp, settings: Callable[[], GuardSettings] = replica_guard_settings) -> None:
        self.app = app
        self._settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            settings = self._settings()
        except Exception:
            logger.exception("cannot read the request guard's settings; refusing the request")
            err = OpenAIError(
                "internal error: the server cannot check this request's credentials",
                status_code=500,
                error_type="internal_error",
            )
            await JSONResponse(err.body(), status_code=500)(scope, receive, send)
            return
        if settings.api_key is not None and scope.get("path", "") not in PUBLIC_PATHS:
            if not _is_authorized(scope, settings.api_key):
                err = OpenAIError(
                    "missing or invalid API key: send `Authorization: Bearer <key>`",
                    status_code=401,
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await JSONResponse(err.body(), status_code=401, headers=err.headers)(scope, receive, send)
                return
        limit_bytes = settings.max_request_body_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit_bytes:
            await _too_large(limit_bytes)(scope, receive, send)
            return
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        # Chunked bodies carry no Content-Length: read (at most the limit) before the app sees it.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message], receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit_bytes:
                await _too_large(limit_bytes)(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body_message: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body_message], receive), send)


def _is_authorized(scope: Scope, api_key: str) -> bool:
    header = b""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            header = value
            break
    scheme, _, token = header.partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    # Constant time: the comparison must not reveal how much of a guessed key is right.
    return hmac.compare_digest(token.strip(), api_key.encode("utf-8"))


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _too_large(limit_bytes: int) -> JSONResponse:
    err = OpenAIError(f"request body larger than {limit_bytes} bytes", status_code=413, code="request_too_large")
    return JSONResponse(err.body(), status_code=413)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A receive() that returns ``messages`` first, then defers to ``receive`` (disconnects)."""
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
