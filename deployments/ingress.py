"""OpenAI-compatible HTTP ingress (FastAPI through ``serve.ingress``): the endpoints and the route/retry loop.

The ingress tokenizes (chat template applied here), validates the sampling parameters, then calls the
engine deployment through a streaming handle with a ``RoutingHint`` as the first argument, so the
engine deployment's page-aware router can place the request (a router on an HTTP-ingress deployment
would be bypassed in HAProxy mode). The first chunk is awaited before the HTTP status is chosen:
bad requests, overload (503/429 + Retry-After) and a dead engine get a proper status and an OpenAI
error body even when the client asked to stream. Around it: ``request_guard`` (API key, body size),
``openai_format`` (request and response bodies, SSE) and ``metrics_scrape`` (``/metrics``).
"""

# No `from __future__ import annotations`: FastAPI must see the request models' real types on the
# methods that serve.ingress wraps, or it reads the body parameter as a query parameter.
import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import ray
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.config import AppConfig
from deployments.engine_deployment import ENGINE_DEAD, StreamChunk
from deployments.metrics_scrape import scrape_engine_metrics
from deployments.openai_format import SSE_DONE, Choices, ResponseFormatter, StreamEvents, http_param, sampling_params
from deployments.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError
from deployments.request_guard import GuardSettings, RequestGuard
from deployments.routing_hint import RoutingHint
from engine.prefix_summary import prefix_probe

logger = logging.getLogger("ray.serve")

app = FastAPI(title="vAttention OpenAI-compatible server")

REPLICA_HEADER = "x-vattn-replica"
# Tries to place a request before its first token when the chosen engine replica turns out dead
# (killed, node lost): nothing reached the client yet, so another replica can serve it.
MAX_ROUTING_ATTEMPTS = 3
# Texts longer than this are tokenized in a worker thread. With throughput-optimized Serve the ingress runs on its
# replica's event loop, beside every stream it relays and its router; Hugging Face's fast tokenizers release the GIL
# while they encode, so the loop keeps running (a 1 MB prompt takes ~0.6 s on one core). Shorter texts, ~3 ms at
# most, are tokenized inline: cheaper than the thread hop.
OFF_LOOP_TOKENIZE_CHARS = 4096


class ReplicaUnavailableError(OpenAIError):
    """The engine replica serving a request died or became unreachable (answered like overload)."""


app.add_middleware(RequestGuard)


@app.exception_handler(OpenAIError)
async def _openai_error_handler(request: Request, exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown paths, wrong methods, unparsable bodies (invalid UTF-8, nesting too deep): OpenAI's shape.
    status = exc.status_code
    err = OpenAIError(
        str(exc.detail),
        status_code=status,
        error_type="invalid_request_error" if status < 500 else "internal_error",
    )
    return JSONResponse(err.body(), status_code=status, headers=getattr(exc, "headers", None))


@app.exception_handler(Exception)
async def _internal_error_handler(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, ray.exceptions.TaskCancelledError):
        # The client hung up and Serve cancelled the request: nobody reads this answer; not an error.
        return JSONResponse({"error": None}, status_code=499)
    logger.exception("unhandled error in %s %s", request.method, request.url.path)
    err = OpenAIError(f"internal error: {type(exc).__name__}", status_code=500, error_type="internal_error")
    return JSONResponse(err.body(), status_code=500)


@app.exception_handler(RequestValidationError)
async def _validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}" for e in errors)
    err = OpenAIError(message or "invalid request", param=loc[0] if loc else None)
    return JSONResponse(jsonable_encoder(err.body()), status_code=400)


def _cancel_quietly(stream: Any) -> None:
    """Cancel an engine call; a call that never got a replica re-raises its routing error on cancel."""
    try:
        stream.cancel()
    except Exception:  # noqa: BLE001 - the original error is what the client must see
        pass


def context_limit_hint(max_model_len: int, max_request_tokens: int) -> str:
    """What sets the context limit a request hit, for the operator reading the client's error: the engine's page pool
    (when it holds less than one sequence may) or its ``max_seq_len``."""
    if max_request_tokens < max_model_len:
        return (
            f" (the engine's whole KV page pool holds {max_request_tokens} tokens of one request; the deployment's "
            "engine_kwargs.kv_cache_memory_bytes or kv_cache_memory_fraction sets the pool)"
        )
    return " (the deployment's engine_kwargs.max_seq_len, up to the model's max_position_embeddings)"


@serve.ingress(app)
class OpenAIIngress:
    """HTTP front door. Args: the engine deployment's handle and ``AppConfig.model_dump()``."""

    def __init__(self, engine: DeploymentHandle, app_config: dict[str, Any]) -> None:
        from engine.sampling_params import SamplingDefaults
        from engine.tokenizer import load_tokenizer
        from engine.weights import read_generation_config, resolve_model

        self._config = AppConfig.model_validate(app_config)
        self._model_id = self._config.model_id
        self._engine = engine
        self._stream_engine = engine.options(stream=True)
        resolved = resolve_model(self._config.model)
        self._tokenizer = load_tokenizer(resolved)
        # A call without truncation or padding clears any the tokenizer file sets; later calls then leave the
        # tokenizer as it is, so that tokenizing in several threads at once never changes it under another.
        self._tokenizer("", add_special_tokens=False)
        # The model's recommended sampling, for the fields a request leaves unset (as vLLM's generation-config auto).
        self._sampling_defaults = SamplingDefaults.from_generation_config(read_generation_config(resolved))
        self._model_limits: tuple[int, int] | None = None  # (max_model_len, max_request_tokens)
        self._prefix_caching: dict[str, int] | None = None  # the engine's block_tokens and seed of prefix keys
        self._created_s = int(time.time())
        self._formatter = ResponseFormatter(self._model_id, self._token_str)
        # Read by RequestGuard on every request (through the replica context); the key is never logged.
        self.guard_settings = GuardSettings(
            api_key=self._config.resolved_api_key(os.environ),
            max_request_body_bytes=self._config.ingress.max_request_body_bytes,
        )

    # ---- endpoints -----------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self) -> JSONResponse:
        """200 once an engine replica answers; 503 otherwise."""
        try:
            await asyncio.wait_for(self._get_model_limits(), timeout=10.0)
        except Exception as exc:  # noqa: BLE001 - any failure means "not healthy"
            return JSONResponse({"status": "unavailable", "detail": str(exc)}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models(self) -> JSONResponse:
        max_model_len, _ = await self._get_model_limits()
        card = {
            "id": self._model_id,
            "object": "model",
            "created": self._created_s,
            "owned_by": "vattention",
            "root": self._config.model,
            "max_model_len": max_model_len,
        }
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/metrics")
    async def metrics(self) -> Response:
        """Prometheus text of every engine replica, gathered from each node's Ray metrics export."""
        exposition = await asyncio.to_thread(scrape_engine_metrics)
        return Response(exposition, media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest) -> Response:
        self._check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - template errors are the request's fault
            raise OpenAIError(f"cannot apply the chat template: {exc}", param="messages") from exc
        prompt_ids = await self._tokenize(text, "messages", add_special_tokens=False)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await self._serve(body, prompt_ids, max_tokens, logprobs, chat=True, prompt_param="messages")

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest) -> Response:
        self._check_model(body.model)
        if body.echo:
            raise OpenAIError("echo is not supported", param="echo")
        if body.suffix:
            raise OpenAIError("suffix is not supported", param="suffix")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise OpenAIError("only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = await self._tokenize(prompt, "prompt")
        else:
            vocab_size = len(self._tokenizer)
            if any(not (0 <= t < vocab_size) for t in prompt):
                raise OpenAIError(f"prompt token ids must be in [0, {vocab_size})", param="prompt")
            prompt_ids = list(prompt)
        return await self._serve(body, prompt_ids, body.max_tokens, body.logprobs, chat=False, prompt_param="prompt")

    # ---- request path --------------------------------------------------------------------------------

    async def _serve(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        prompt_ids: list[int],
        max_tokens: int | None,
        logprobs: int | None,
        *,
        chat: bool,
        prompt_param: str,
    ) -> Response:
        if not prompt_ids:
            raise OpenAIError("the prompt is empty", param=prompt_param)
        # The model's context, also bounded by the engine's whole page pool: a longer request could never run.
        max_model_len, max_request_tokens = await self._get_model_limits()
        room = max_request_tokens - len(prompt_ids)
        if room < 1:
            raise OpenAIError(
                f"the prompt has {len(prompt_ids)} tokens; this model's maximum context length is {max_request_tokens}"
                + context_limit_hint(max_model_len, max_request_tokens),
                param=prompt_param,
                code="context_length_exceeded",
            )
        if isinstance(max_tokens, int) and max_tokens >= 1 and max_tokens > room:
            raise OpenAIError(
                f"max_tokens={max_tokens} plus the prompt's {len(prompt_ids)} tokens exceed this model's maximum "
                f"context length {max_request_tokens}" + context_limit_hint(max_model_len, max_request_tokens),
                param="max_tokens",
                code="context_length_exceeded",
            )
        params = sampling_params(body, max_tokens, logprobs, room, self._sampling_defaults, chat=chat)

        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        hint = RoutingHint(
            num_prompt_tokens=len(prompt_ids),
            max_tokens=params.max_tokens,
            num_sequences=params.n,
            prefix_probe=self._prefix_probe(prompt_ids),
        )
        for attempt in range(MAX_ROUTING_ATTEMPTS):
            # Overload errors are raised outside the except blocks: Serve renders any exception whose
            # context is a BackPressureError with its own plain-text handler, not our OpenAI JSON.
            overload: str | None = None
            try:
                # remote() itself raises BackPressureError when this caller's queue is full. Each attempt has an
                # engine request id of its own: a replica that only looked dead may still emit the first attempt's
                # final "abort" output, which must not end the retry's stream if the retry lands there too.
                engine_request_id = request_id if attempt == 0 else f"{request_id}-{attempt}"
                stream = self._stream_engine.generate.remote(hint, prompt_ids, params, engine_request_id)
            except BackPressureError as exc:
                overload = str(exc)
            if overload is not None:
                raise self._overload_error(overload)
            try:
                first = await self._next_chunks(stream)
                break
            except ReplicaUnavailableError:
                _cancel_quietly(stream)
                if attempt + 1 == MAX_ROUTING_ATTEMPTS:
                    raise
                logger.warning("engine replica unavailable before %s started; routing it again", request_id)
            except BaseException:
                _cancel_quietly(stream)
                raise
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        # Which engine replica served the request: for operators' debugging and the routing tests.
        headers = {REPLICA_HEADER: first[0].replica} if first else {}
        choices = Choices(params.n)
        if body.stream:
            sse = self._sse(stream, first, choices, request_id, chat=chat, include_usage=include_usage)
            headers["Cache-Control"] = "no-cache"
            return StreamingResponse(sse, media_type="text/event-stream", headers=headers)
        return JSONResponse(await self._collect(stream, first, choices, request_id, chat=chat), headers=headers)

    async def _next_chunks(self, stream: Any) -> list[StreamChunk] | None:
        """The next item of the engine stream (every chunk the replica had ready), or None at its end; errors
        become ``OpenAIError``."""
        overload: str | None = None
        try:
            chunks: list[StreamChunk] = await stream.__anext__()
        except StopAsyncIteration:
            return None
        except BackPressureError as exc:
            overload = str(exc)
        except ray.exceptions.RayTaskError as exc:
            if not isinstance(exc.cause, BackPressureError):
                raise OpenAIError(
                    f"engine failure: {exc.cause!r}", status_code=500, error_type="internal_error"
                ) from exc
            overload = str(exc.cause)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, grpc.aio.AioRpcError) as exc:
            # Over gRPC (Serve's throughput-optimized mode) only UNAVAILABLE arrives as ActorUnavailableError; a
            # stream reset (INTERNAL) or any other status arrives raw.
            what = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__
            unavailable = self._overload_error(f"engine replica unavailable: {what}")
            raise ReplicaUnavailableError(
                unavailable.message,
                status_code=unavailable.status_code,
                error_type=unavailable.error_type,
                code=unavailable.code,
                headers=unavailable.headers,
            ) from None
        if overload is not None:
            raise self._overload_error(overload)
        for chunk in chunks:
            if chunk.error is not None:
                err = chunk.error
                if err["type"] == ENGINE_DEAD:
                    # The replica's engine died (the router has not heard yet): as a dead replica, routed again
                    # before the request's first token; reported in-band after it.
                    raise ReplicaUnavailableError(err["message"], status_code=chunk.status_code, error_type=err["type"])
                # The engine's own checks (context length, JSON schema) name fields spelled alike on both endpoints.
                param = http_param(err.get("param"), chat=False)
                raise OpenAIError(err["message"], status_code=chunk.status_code, error_type=err["type"], param=param)
        return chunks

    def _overload_error(self, message: str) -> OpenAIError:
        ingress = self._config.ingress
        return OpenAIError(
            f"server overloaded, retry later ({message})",
            status_code=ingress.overload_status_code,
            error_type="server_overloaded",
            code="overloaded",
            headers={"Retry-After": str(max(1, round(ingress.retry_after_s)))},
        )

    async def _collect(
        self, stream: Any, first: list[StreamChunk] | None, choices: Choices, request_id: str, *, chat: bool
    ) -> dict:
        chunks = first
        try:
            while chunks is not None:
                for chunk in chunks:
                    choices.add(chunk)
                if choices.all_finished:
                    break
                chunks = await self._next_chunks(stream)
        finally:
            # Also runs when the client disconnects (this task is cancelled): abort in the engine.
            _cancel_quietly(stream)
        return self._formatter.completion(request_id, choices, chat=chat)

    async def _sse(
        self,
        stream: Any,
        first: list[StreamChunk] | None,
        choices: Choices,
        request_id: str,
        *,
        chat: bool,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        events = StreamEvents(self._formatter, request_id, chat=chat, include_usage=include_usage)
        chunks = first
        try:
            for opening in events.opening(choices.num_choices):
                yield opening
            while chunks is not None:
                text = []  # the item's events in one write
                for chunk in chunks:
                    choices.add(chunk)
                    event = events.chunk(chunk)
                    if event is not None:
                        text.append(event)
                if text:
                    yield "".join(text)
                if choices.all_finished:
                    break
                try:
                    chunks = await self._next_chunks(stream)
                except OpenAIError as exc:
                    # Headers are gone: report in-band, then end the stream.
                    yield events.error(exc)
                    return
            usage = events.usage(choices)
            if usage is not None:
                yield usage
            yield SSE_DONE
        finally:
            # Client disconnect cancels this generator: cancelling the handle call aborts the request
            # in the engine replica, which frees its batch slot and KV pages.
            _cancel_quietly(stream)

    # ---- helpers -------------------------------------------------------------------------------------

    async def _tokenize(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        """The text's token ids; off the event loop when the text is long (``OFF_LOOP_TOKENIZE_CHARS``)."""
        try:
            # JSON may carry lone surrogates (valid escapes, not valid text): the tokenizer cannot take them.
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise OpenAIError(f"the text is not valid Unicode: {exc.reason}", param=param) from None
        if len(text) <= OFF_LOOP_TOKENIZE_CHARS:
            encoded = self._tokenizer(text, add_special_tokens=add_special_tokens)
        else:
            encoded = await asyncio.to_thread(self._tokenizer, text, add_special_tokens=add_special_tokens)
        return list(encoded["input_ids"])

    def _check_model(self, model: str) -> None:
        if model != self._model_id:
            raise OpenAIError(
                f"the model {model!r} does not exist; this server serves {self._model_id!r}",
                status_code=404,
                param="model",
                code="model_not_found",
            )

    async def _get_model_limits(self) -> tuple[int, int]:
        """``(max_model_len, max_request_tokens)`` of the engine replicas, asked once."""
        if self._model_limits is None:
            info = await self._engine.model_info.remote()
            self._prefix_caching = info.get("prefix_caching")
            self._model_limits = (int(info["max_model_len"]), int(info["max_request_tokens"]))
        return self._model_limits

    def _prefix_probe(self, prompt_ids: list[int]) -> tuple[tuple[int, int], ...]:
        """The prompt's keys at the positions replicas summarize their cached prefixes at (the router compares)."""
        if self._prefix_caching is None:
            return ()
        return prefix_probe(prompt_ids, self._prefix_caching["block_tokens"], self._prefix_caching["seed"])

    def _token_str(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id])
