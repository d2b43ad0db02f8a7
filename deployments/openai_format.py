"""Translation between OpenAI's wire format and the engine's.

In: a validated request body becomes the engine's ``SamplingParams`` (its range errors become 400s).
Out: engine ``StreamChunk``s, of each of the request's ``n`` choices, become a ``chat.completion`` /
``text_completion`` JSON body, or server-sent events of ``chat.completion.chunk`` / ``text_completion`` objects,
with OpenAI's choice indices, logprobs and usage shapes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from deployments.engine_deployment import StreamChunk
from deployments.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError, ResponseFormat

if TYPE_CHECKING:
    from engine.sampling_params import SamplingDefaults, SamplingParams

SSE_DONE = "data: [DONE]\n\n"


def sampling_params(
    body: ChatCompletionRequest | CompletionRequest,
    max_tokens: int | None,
    logprobs: int | None,
    default_max_tokens: int,
    defaults: SamplingDefaults,
    *,
    chat: bool,
) -> SamplingParams:
    """The engine's ``SamplingParams`` of a request; an out-of-range field raises a 400 ``OpenAIError``.

    ``max_tokens`` and ``logprobs`` are passed apart because chat and text completions name them
    differently. A field the request leaves unset takes the model's default (``defaults``, from its
    ``generation_config.json``), else the engine's; ``max_tokens`` unset is the model's ``max_new_tokens`` capped at
    ``default_max_tokens`` (the room left in the context), else that room.
    """
    from engine.errors import InvalidRequestError

    if max_tokens is None:
        max_tokens = min(defaults.max_tokens or default_max_tokens, default_max_tokens)
    try:
        return defaults.params(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=body.stop,
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            n=body.n,
            json_schema=_json_schema(body.response_format),
        )
    except InvalidRequestError as exc:
        raise OpenAIError(exc.message, param=http_param(exc.param, chat=chat)) from exc


def http_param(param: str | None, *, chat: bool) -> str | None:
    """The request field, as the client named it, of an engine error's ``param``."""
    if param == "json_schema":
        return "response_format"
    if chat and param == "logprobs":
        return "top_logprobs"
    return param


def _json_schema(response_format: ResponseFormat | None) -> dict[str, Any] | None:
    """The engine's ``json_schema`` of a ``response_format``: ``json_object`` is the schema of any object."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"type": "object"}
    return response_format.json_schema.schema_


class Choices:
    """What the ``n`` choices of one request have produced so far, fed chunk by chunk (indices interleaved)."""

    def __init__(self, n: int) -> None:
        self.num_choices = n
        self.texts: list[list[str]] = [[] for _ in range(n)]
        self.logprobs: list[list[dict]] = [[] for _ in range(n)]
        self.finish_reasons: list[str | None] = [None] * n
        self._num_output_tokens = [0] * n
        self._num_prompt_tokens = 0
        self._num_finished = 0

    def add(self, chunk: StreamChunk) -> None:
        i = chunk.index
        self.texts[i].append(chunk.new_text)
        self.logprobs[i].extend(chunk.new_logprobs or [])
        self._num_output_tokens[i] = chunk.num_output_tokens
        self._num_prompt_tokens = chunk.num_prompt_tokens
        if chunk.finished:
            self.finish_reasons[i] = chunk.finish_reason
            self._num_finished += 1

    @property
    def all_finished(self) -> bool:
        return self._num_finished == self.num_choices

    def usage(self) -> dict[str, int]:
        """OpenAI's ``usage``: the prompt counted once, the completion tokens of every choice summed."""
        prompt = self._num_prompt_tokens
        completion = sum(self._num_output_tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class ResponseFormatter:
    """OpenAI response bodies of one served model.

    Args:
        model_id: the ``model`` field of every response.
        decode_token: the text of one token id (logprobs name tokens by their text and UTF-8 bytes).
    """

    def __init__(self, model_id: str, decode_token: Callable[[int], str]) -> None:
        self.model_id = model_id
        self._decode_token = decode_token

    def completion(self, request_id: str, choices: Choices, *, chat: bool) -> dict[str, Any]:
        """The whole (non-streamed) answer; a choice that never finished (the request was cut) reads "abort"."""
        bodies = []
        for i in range(choices.num_choices):
            text = "".join(choices.texts[i])
            entries = choices.logprobs[i]
            finish_reason = choices.finish_reasons[i] or "abort"
            if chat:
                logprobs = self.chat_logprobs(entries) if entries else None
                body = {"index": i, "message": {"role": "assistant", "content": text}}
            else:
                logprobs = self.completion_logprobs(entries) if entries else None
                body = {"index": i, "text": text}
            bodies.append({**body, "logprobs": logprobs, "finish_reason": finish_reason})
        return {
            "id": request_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_id,
            "choices": bodies,
            "usage": choices.usage(),
        }

    def chat_logprobs(self, entries: list[dict]) -> dict:
        """Chat's ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}, ...]}``."""
        content = []
        for e in entries:
            token = self._decode_token(e["token_id"])
            content.append(
                {
                    "token": token,
                    "logprob": float(e["logprob"]),
                    "bytes": list(token.encode("utf-8")),
                    "top_logprobs": [
                        {
                            "token": (t := self._decode_token(tid)),
                            "logprob": float(lp),
                            "bytes": list(t.encode("utf-8")),
                        }
                        for tid, lp in e.get("top", [])
                    ],
                }
            )
        return {"content": content}

    def completion_logprobs(self, entries: list[dict]) -> dict:
        """Text completions' ``logprobs``: parallel lists of tokens, their logprobs and alternatives."""
        tokens = [self._decode_token(e["token_id"]) for e in entries]
        return {
            "tokens": tokens,
            "token_logprobs": [float(e["logprob"]) for e in entries],
            "top_logprobs": [{self._decode_token(tid): float(lp) for tid, lp in e.get("top", [])} for e in entries],
            "text_offset": [],
        }


class StreamEvents:
    """The server-sent events of one streamed answer, each a ``data: ...\\n\\n`` string.

    Args:
        formatter: the served model's formatter (model id, logprobs).
        request_id: the ``id`` of every event.
        chat: chat (``chat.completion.chunk`` with deltas) or text completion events.
        include_usage: every event carries ``usage`` (null but in the last one), as OpenAI's
            ``stream_options.include_usage`` asks.
    """

    def __init__(self, formatter: ResponseFormatter, request_id: str, *, chat: bool, include_usage: bool) -> None:
        self._formatter = formatter
        self._request_id = request_id
        self._chat = chat
        self._include_usage = include_usage
        self._created = int(time.time())
        self._object = "chat.completion.chunk" if chat else "text_completion"

    def opening(self, n: int) -> list[str]:
        """Events before the first chunk: chat announces the assistant's role in each of the ``n`` choices."""
        if not self._chat:
            return []
        return [
            self._event(
                [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
            )
            for i in range(n)
        ]

    def chunk(self, chunk: StreamChunk) -> str | None:
        """The event of one engine chunk; ``None`` when it carries nothing to send (no text, not finished)."""
        if not (chunk.new_text or chunk.finished):
            return None
        lp = chunk.new_logprobs or []
        finish = chunk.finish_reason if chunk.finished else None
        if self._chat:
            delta = {"content": chunk.new_text} if chunk.new_text else {}
            logprobs = self._formatter.chat_logprobs(lp) if lp else None
            choice = {"index": chunk.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            logprobs = self._formatter.completion_logprobs(lp) if lp else None
            choice = {"index": chunk.index, "text": chunk.new_text, "logprobs": logprobs, "finish_reason": finish}
        return self._event([choice])

    def usage(self, choices: Choices) -> str | None:
        """The closing usage event (no choices), or ``None`` when usage was not asked for."""
        return self._event([], choices.usage()) if self._include_usage else None

    @staticmethod
    def error(exc: OpenAIError) -> str:
        """An error after the headers are sent: reported in-band, as OpenAI's servers do."""
        return f"data: {json.dumps(exc.body())}\n\n"

    def _event(self, choices: list[dict], usage: dict | None = None) -> str:
        payload: dict[str, Any] = {
            "id": self._request_id,
            "object": self._object,
            "created": self._created,
            "model": self._formatter.model_id,
            "choices": choices,
        }
        if self._include_usage:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"
