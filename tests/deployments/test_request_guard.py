"""The request guard on its own, in front of a stub ASGI app (no Ray cluster).

The authentication and body-limit answers through a real Serve app are in test_validation.py; this file
checks what a real app cannot show: a guard that cannot read its settings refuses every request.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
import pytest
from ray import serve

from deployments.request_guard import GuardSettings, RequestGuard

API_KEY = "guard-key-1"


class _StubApp:
    """The app behind the guard: answers 200 and counts the requests that reach it."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope, receive, send) -> None:
        self.calls += 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


class _BrokenIngress:
    """A servable object whose every attribute lookup fails."""

    def __getattr__(self, name: str):
        raise RuntimeError(f"cannot read {name}")


def _request(guard: RequestGuard, method: str, path: str, **kwargs) -> httpx.Response:
    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=guard)
        async with httpx.AsyncClient(transport=transport, base_url="http://guard") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(send())


def _with_servable(monkeypatch, servable) -> None:
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=servable))


@pytest.mark.parametrize(
    "servable",
    [_BrokenIngress(), SimpleNamespace(), SimpleNamespace(guard_settings={"api_key": None})],
    ids=["lookup-raises", "no-settings", "wrong-type"],
)
def test_unreadable_settings_refuse_every_request(monkeypatch, servable):
    _with_servable(monkeypatch, servable)
    stub = _StubApp()
    guard = RequestGuard(stub)
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/health")):
        r = _request(guard, method, path, json={} if method == "POST" else None)
        assert r.status_code == 500, (path, r.text)
        assert r.json()["error"]["type"] == "internal_error"
    assert stub.calls == 0


def test_outside_a_serve_replica_every_request_is_refused():
    stub = _StubApp()
    r = _request(RequestGuard(stub), "GET", "/v1/models")
    assert r.status_code == 500 and stub.calls == 0


def test_settings_from_the_replica_ingress_are_enforced(monkeypatch):
    _with_servable(monkeypatch, SimpleNamespace(guard_settings=GuardSettings(API_KEY, max_request_body_bytes=1024)))
    stub = _StubApp()
    guard = RequestGuard(stub)
    assert _request(guard, "GET", "/v1/models").status_code == 401
    assert _request(guard, "GET", "/health").status_code == 200
    auth = {"Authorization": f"Bearer {API_KEY}"}
    assert _request(guard, "GET", "/v1/models", headers=auth).status_code == 200
    assert _request(guard, "POST", "/v1/completions", headers=auth, content=b"x" * 1025).status_code == 413
    assert stub.calls == 2


def test_the_key_is_not_in_the_settings_repr():
    assert API_KEY not in repr(GuardSettings(API_KEY, max_request_body_bytes=1024))
