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
