"""Translation between OpenAI's wire format and the engine's.

In: a validated request body becomes the engine's ``SamplingParams`` (its range errors become 400s).
Out: engine ``StreamChunk``s become a ``chat.completion`` / ``text_completion`` JSON body, or server-sent
events of ``chat.completion.chunk`` / ``text_completion`` objects, with OpenAI's logprobs and usage shapes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from deployments.engine_deployment import StreamChunk
from deployments.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError

if TYPE_CHECKING:
    from engine.sampling_params import SamplingParams

SSE_DONE = "data: [DONE]\n\n"


def sampling_params(
    body: ChatCompletionRequest | CompletionRequest,
    max_tokens: int | None,
    logprobs: int | None,
    default_max_tokens: int,
    *,
    chat: bool,
) -> SamplingParams:
    """The engine's ``SamplingParams`` of a request; an out-of-range field raises a 400 ``OpenAIError``.

    ``max_tokens`` and ``logprobs`` are passed apart because chat and text completions name them
    differently; ``default_max_tokens`` applies when ``max_tokens`` is ``None``.
    """
    from engine.errors import InvalidRequestError
    from engine.sampling_params import SamplingParams

    try:
        return SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=-1 if body.top_k is None else body.top_k,
            seed=body.seed,
            stop=body.stop,
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            n=body.n,
        )
    except InvalidRequestError as exc:
        param = "top_logprobs" if chat and exc.param == "logprobs" else exc.param
        raise OpenAIError(exc.message, param=param) from exc


def token_usage(last: StreamChunk | None) -> dict[str, int]:
    """OpenAI's ``usage`` object from the last chunk of a request (zeros when there was none)."""
    prompt = last.num_prompt_tokens if last is not None else 0
    completion = last.num_output_tokens if last is not None else 0
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

    def completion(
        self, request_id: str, text: str, logprob_entries: list[dict], last: StreamChunk | None, *, chat: bool
    ) -> dict[str, Any]:
        """The whole (non-streamed) answer; ``last`` is the request's last chunk (``None``: aborted)."""
        finish_reason = last.finish_reason if last is not None else "abort"
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": self.chat_logprobs(logprob_entries) if logprob_entries else None,
                "finish_reason": finish_reason,
            }
            obj = "chat.completion"
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": self.completion_logprobs(logprob_entries) if logprob_entries else None,
                "finish_reason": finish_reason,
            }
            obj = "text_completion"
        return {
            "id": request_id,
            "object": obj,
            "created": int(time.time()),
            "model": self.model_id,
            "choices": [choice],
            "usage": token_usage(last),
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

    def opening(self) -> list[str]:
        """Events before the first chunk: chat announces the assistant's role."""
        if not self._chat:
            return []
        return [
            self._event(
                [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
            )
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
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            logprobs = self._formatter.completion_logprobs(lp) if lp else None
            choice = {"index": 0, "text": chunk.new_text, "logprobs": logprobs, "finish_reason": finish}
        return self._event([choice])

    def usage(self, last: StreamChunk | None) -> str | None:
        """The closing usage event (no choices), or ``None`` when usage was not asked for."""
        return self._event([], token_usage(last)) if self._include_usage else None

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
