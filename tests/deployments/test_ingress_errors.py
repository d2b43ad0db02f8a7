"""The ingress's handling of a failed engine stream, without a cluster."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest

from deployments.ingress import OpenAIIngress, ReplicaUnavailableError
from deployments.protocol import OpenAIError


class _FailingStream:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def __anext__(self):
        raise self.exc


def _overload(message: str) -> OpenAIError:
    return OpenAIError(message, status_code=503, error_type="server_overloaded", code="overloaded")


@pytest.mark.parametrize("code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_a_grpc_failure_of_the_engine_stream_is_an_unavailable_replica(code):
    """Serve's gRPC transport turns only UNAVAILABLE into ActorUnavailableError: a reset stream or any other status
    must still be the error the ingress routes again before the first token (and reports in-band after it)."""
    error = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="stream reset")
    ingress = SimpleNamespace(_overload_error=_overload)
    with pytest.raises(ReplicaUnavailableError, match=code.name) as raised:
        asyncio.run(OpenAIIngress._next_chunks(ingress, _FailingStream(error)))
    assert raised.value.status_code == 503


def test_a_request_routed_again_gets_an_engine_request_id_of_its_own():
    """A replica that looked dead (its stream failed before the first token) may be alive and picked again: the
    retry must not reuse the first attempt's engine request id, whose final "abort" output would end it."""
    from deployments.protocol import CompletionRequest
    from engine.sampling_params import SamplingDefaults

    sent = []

    class _Stream:
        def cancel(self) -> None:
            pass

    def remote(hint, prompt_ids, params, request_id):
        sent.append(request_id)
        return _Stream()

    async def next_chunks(stream):
        if len(sent) == 1:
            raise ReplicaUnavailableError("replica gone", status_code=503)
        return None

    async def collect(stream, first, choices, request_id, chat):
        return {"id": request_id}

    async def limits():
        return 1000, 1000

    ingress = SimpleNamespace(
        _get_model_limits=limits,
        _sampling_defaults=SamplingDefaults(),
        _prefix_probe=lambda ids: None,
        _stream_engine=SimpleNamespace(generate=SimpleNamespace(remote=remote)),
        _next_chunks=next_chunks,
        _collect=collect,
        _overload_error=_overload,
    )
    body = CompletionRequest(model="m", prompt=[1, 2, 3], max_tokens=4)
    response = asyncio.run(OpenAIIngress._serve(ingress, body, [1, 2, 3], 4, None, chat=False, prompt_param="prompt"))
    assert len(sent) == 2 and sent[0] != sent[1]
    assert sent[0] in response.body.decode()  # the client sees one id: the first attempt's


def test_an_engine_dead_answer_is_an_unavailable_replica():
    """A replica whose engine died answers at once with ``engine_dead`` until the router hears of it: before the
    first token that is routed again like a dead replica."""
    from deployments.engine_deployment import StreamChunk

    class _Stream:
        async def __anext__(self):
            return [
                StreamChunk(
                    error={"message": "engine step failed", "type": "engine_dead", "param": None}, status_code=503
                )
            ]

    ingress = SimpleNamespace(_overload_error=_overload)
    with pytest.raises(ReplicaUnavailableError, match="engine step failed") as raised:
        asyncio.run(OpenAIIngress._next_chunks(ingress, _Stream()))
    assert raised.value.status_code == 503
