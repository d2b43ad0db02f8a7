"""What the engine core and its frontend say to each other, and its msgpack encoding for the process boundary.

Frontend -> core: ``("add", request_id, prompt_token_ids, SamplingParams)``, ``("abort", request_id)``,
``("stop",)``; one message each, sent at once. Core -> frontend, through a :class:`CoreOutbox`: every step's outputs with the stats after it,
a request refused at ``add``, or the core's death. In one process these are Python calls; across processes each
is one msgpack message (:func:`encode_command` / :func:`decode_command`, :func:`encode_event` / ``decode_event``).
"""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any, Protocol

import msgpack

from engine.errors import EngineError, InvalidRequestError, PromptTooLongError
from engine.outputs import EngineStats, RequestOutput
from engine.prefix_summary import PrefixSummary

ADD, ABORT, STOP = "add", "abort", "stop"
SHUT_DOWN = "the engine was shut down"  # the death notice of a core that was told to stop
READY, STEP, REJECTED, DEAD = "ready", "step", "rejected", "dead"


@dataclasses.dataclass(frozen=True)
class CoreInfo:
    """What the frontend needs of the engine before any request: limits and the first stats."""

    max_model_len: int
    max_request_tokens: int
    stats: EngineStats


class CoreOutbox(Protocol):
    """Where the engine core's events go (the frontend itself, or the pipe to it)."""

    def step(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        """One step's outputs (every request that progressed or finished) and the stats after it."""

    def rejected(self, request_id: str, error: BaseException) -> None:
        """``add`` refused the request (bad parameters, a prompt that can never fit)."""

    def dead(self, message: str) -> None:
        """The core stopped: a step failed, the loop crashed, or it was shut down."""


# ---- the process boundary --------------------------------------------------------------------------


def encode_command(command: tuple) -> bytes:
    if command[0] == ADD:
        # Pickled: a request's fields may hold integers past msgpack's 64 bits (top_k, stop_token_ids) that the
        # engine accepts. Only this process's user can reach the socket (a private 0700 directory).
        return msgpack.packb([ADD, pickle.dumps(command[1:], protocol=pickle.HIGHEST_PROTOCOL)])
    return msgpack.packb(list(command))


def decode_command(data: bytes) -> tuple:
    command = msgpack.unpackb(data)
    if command[0] == ADD:
        request_id, prompt_token_ids, params = pickle.loads(command[1])
        return ADD, request_id, prompt_token_ids, params
    return tuple(command)


def encode_ready(info: CoreInfo) -> bytes:
    return msgpack.packb([READY, info.max_model_len, info.max_request_tokens, _stats_fields(info.stats)])


def encode_step(outputs: list[RequestOutput], stats: EngineStats) -> bytes:
    return msgpack.packb([STEP, [_output_fields(out) for out in outputs], _stats_fields(stats)])


def encode_rejected(request_id: str, error: BaseException) -> bytes:
    return msgpack.packb([REJECTED, request_id, _error_fields(error)])


def encode_dead(message: str) -> bytes:
    return msgpack.packb([DEAD, message])


def decode_event(data: bytes) -> tuple:
    """``(READY, CoreInfo)``, ``(STEP, outputs, stats)``, ``(REJECTED, request_id, error)`` or ``(DEAD, message)``.
    Outputs come without ``prompt_token_ids`` (the frontend has them)."""
    event = msgpack.unpackb(data, use_list=True)
    kind = event[0]
    if kind == STEP:
        return STEP, [_output(fields) for fields in event[1]], _stats(event[2])
    if kind == REJECTED:
        return REJECTED, event[1], _error(event[2])
    if kind == READY:
        return READY, CoreInfo(event[1], event[2], _stats(event[3]))
    return DEAD, event[1]


def _stats_fields(stats: EngineStats) -> dict[str, Any]:
    return dataclasses.asdict(stats)


def _stats(fields: dict[str, Any]) -> EngineStats:
    summary = fields.get("prefix_summary")
    if summary is not None:
        fields = {
            **fields,
            "prefix_summary": PrefixSummary(summary["block_tokens"], summary["seed"], tuple(summary["keys"])),
        }
    return EngineStats(**fields)


def _output_fields(out: RequestOutput) -> list:
    return [
        out.request_id,
        out.index,
        out.new_token_ids,
        out.new_text,
        out.text,
        out.token_ids,
        out.finished,
        out.finish_reason,
        out.stop_reason,
        out.num_prompt_tokens,
        out.num_output_tokens,
        out.arrival_time,
        out.first_token_time,
        out.new_logprobs,
        None if out.error is None else _error_fields(out.error),
        out.num_cached_tokens,
    ]


def _output(fields: list) -> RequestOutput:
    (request_id, index, new_token_ids, new_text, text, token_ids, finished, finish_reason, stop_reason) = fields[:9]
    num_prompt_tokens, num_output_tokens, arrival_time, first_token_time, new_logprobs, error, cached = fields[9:]
    return RequestOutput(
        request_id=request_id,
        prompt_token_ids=None,
        new_token_ids=new_token_ids,
        new_text=new_text,
        text=text,
        token_ids=token_ids,
        finished=finished,
        finish_reason=finish_reason,
        stop_reason=stop_reason,
        num_prompt_tokens=num_prompt_tokens,
        num_output_tokens=num_output_tokens,
        arrival_time=arrival_time,
        first_token_time=first_token_time,
        new_logprobs=new_logprobs,
        error=None if error is None else _error(error),
        index=index,
        num_cached_tokens=cached,
    )


def _error_fields(error: BaseException) -> list:
    if isinstance(error, PromptTooLongError):
        return ["prompt_too_long", error.message, error.param]
    if isinstance(error, InvalidRequestError):
        return ["invalid_request", error.message, error.param]
    return ["engine", f"{type(error).__name__}: {error}", None]


def _error(fields: list) -> BaseException:
    kind, message, param = fields
    if kind == "prompt_too_long":
        return PromptTooLongError(message, param)
    if kind == "invalid_request":
        return InvalidRequestError(message, param)
    return EngineError(message)
