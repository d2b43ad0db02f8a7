"""OpenAI-compatible HTTP ingress (FastAPI through ``serve.ingress``).

The ingress tokenizes (chat template applied here), validates the sampling parameters, then calls the
engine deployment through a streaming handle with a ``RoutingHint`` as the first argument, so the
engine deployment's page-aware router can place the request (a router on an HTTP-ingress deployment
would be bypassed in HAProxy mode). The first chunk is awaited before the HTTP status is chosen:
bad requests, overload (503/429 + Retry-After) and a dead engine get a proper status and an OpenAI
error body even when the client asked to stream.
"""

# No `from __future__ import annotations`: FastAPI must see the request models' real types on the
# methods that serve.ingress wraps, or it reads the body parameter as a query parameter.
import asyncio
import hmac
import json
import logging
import os
import time
import urllib.request
import uuid
from typing import Any, AsyncIterator

import ray
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from deployments.config import AppConfig, IngressConfig
from deployments.engine_deployment import StreamChunk
from deployments.metrics_merge import merge_prometheus_texts
from deployments.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError
from deployments.routing_hint import RoutingHint

logger = logging.getLogger("ray.serve")

app = FastAPI(title="vAttention OpenAI-compatible server")

# Families gathered by /metrics from every node's Ray metrics export (see engine_metrics.py).
METRIC_PREFIXES = ("ray_vllm_", "ray_vattn_")
REPLICA_HEADER = "x-vattn-replica"
# Paths answered without the API key (load balancers and Serve's own probes have no key).
PUBLIC_PATHS = frozenset({"/health"})
# Tries to place a request before its first token when the chosen engine replica turns out dead
# (killed, node lost): nothing reached the client yet, so another replica can serve it.
MAX_ROUTING_ATTEMPTS = 3


class RequestGuard:
    """ASGI middleware run before any routing or body parsing: API key, then body size.

    Settings come from the ingress replica's servable object (``serve.get_replica_context()``), so the
    FastAPI app stays a module-level object as ``serve.ingress`` requires. Outside Serve (no replica
    context) nothing is enforced but the default body limit.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        api_key, limit_bytes = _guard_settings()
        if api_key is not None and scope.get("path", "") not in PUBLIC_PATHS:
            if not _is_authorized(scope, api_key):
                err = OpenAIError(
                    "missing or invalid API key: send `Authorization: Bearer <key>`",
                    status_code=401,
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await JSONResponse(err.body(), status_code=401, headers=err.headers)(scope, receive, send)
                return
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


def _guard_settings() -> tuple[str | None, int]:
    try:
        ingress = serve.get_replica_context().servable_object
        return ingress._api_key, ingress._config.ingress.max_request_body_bytes
    except Exception:  # noqa: BLE001 - not inside a Serve replica (unit use of the app)
        return None, IngressConfig().max_request_body_bytes


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
    err = OpenAIError(
        f"request body larger than {limit_bytes} bytes", status_code=413, code="request_too_large"
    )
    return JSONResponse(err.body(), status_code=413)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A receive() that returns ``messages`` first, then defers to ``receive`` (disconnects)."""
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


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


def _usage(last: StreamChunk | None) -> dict[str, int]:
    prompt = last.num_prompt_tokens if last is not None else 0
    completion = last.num_output_tokens if last is not None else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _cancel_quietly(stream: Any) -> None:
    """Cancel an engine call; a call that never got a replica re-raises its routing error on cancel."""
    try:
        stream.cancel()
    except Exception:  # noqa: BLE001 - the original error is what the client must see
        pass


def _scrape_ray_nodes() -> list[str]:
    """Prometheus text from the metrics export port of every alive Ray node."""
    texts = []
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if not node.get("Alive") or not port:
            continue
        url = f"http://{node['NodeManagerAddress']}:{port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                texts.append(resp.read().decode("utf-8", errors="replace"))
        except OSError as exc:
            logger.warning("cannot scrape %s: %s", url, exc)
    return texts


@serve.ingress(app)
class OpenAIIngress:
    """HTTP front door. Args: the engine deployment's handle and ``AppConfig.model_dump()``."""

    def __init__(self, engine: DeploymentHandle, app_config: dict[str, Any]) -> None:
        from engine.config import ModelConfig
        from engine.tokenizer import load_tokenizer

        self._config = AppConfig.model_validate(app_config)
        self._model_id = self._config.model_id
        self._engine = engine
        self._stream_engine = engine.options(stream=True)
        self._tokenizer = load_tokenizer(ModelConfig(model=self._config.model))
        self._model_limits: tuple[int, int] | None = None  # (max_model_len, max_request_tokens)
        self._created_s = int(time.time())
        self._api_key = self._config.resolved_api_key(os.environ)  # read by RequestGuard; never logged

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
        texts = await asyncio.to_thread(_scrape_ray_nodes)
        return Response(merge_prometheus_texts(texts, METRIC_PREFIXES), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest) -> Response:
        self._check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - template errors are the request's fault
            raise OpenAIError(f"cannot apply the chat template: {exc}", param="messages") from exc
        prompt_ids = self._tokenize(text, "messages", add_special_tokens=False)
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
            prompt_ids = self._tokenize(prompt, "prompt")
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
        from engine.errors import InvalidRequestError
        from engine.sampling_params import SamplingParams

        if not prompt_ids:
            raise OpenAIError("the prompt is empty", param=prompt_param)
        # The model's context, also bounded by the engine's whole page pool: a longer request could never run.
        _, max_request_tokens = await self._get_model_limits()
        room = max_request_tokens - len(prompt_ids)
        if room < 1:
            raise OpenAIError(
                f"the prompt has {len(prompt_ids)} tokens; this model's maximum context length is "
                f"{max_request_tokens}",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if isinstance(max_tokens, int) and max_tokens >= 1 and max_tokens > room:
            raise OpenAIError(
                f"max_tokens={max_tokens} plus the prompt's {len(prompt_ids)} tokens exceed this model's maximum "
                f"context length {max_request_tokens}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        try:
            params = SamplingParams(
                max_tokens=max_tokens if max_tokens is not None else room,
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

        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        hint = RoutingHint(num_prompt_tokens=len(prompt_ids), max_tokens=params.max_tokens)
        for attempt in range(MAX_ROUTING_ATTEMPTS):
            # Overload errors are raised outside the except blocks: Serve renders any exception whose
            # context is a BackPressureError with its own plain-text handler, not our OpenAI JSON.
            overload: str | None = None
            try:
                # remote() itself raises BackPressureError when this caller's queue is full.
                stream = self._stream_engine.generate.remote(hint, prompt_ids, params, request_id)
            except BackPressureError as exc:
                overload = str(exc)
            if overload is not None:
                raise self._overload_error(overload)
            try:
                first = await self._next_chunk(stream)
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
        headers = {REPLICA_HEADER: first.replica} if first is not None else {}
        if body.stream:
            sse = self._sse(stream, first, request_id, chat=chat, include_usage=include_usage)
            headers["Cache-Control"] = "no-cache"
            return StreamingResponse(sse, media_type="text/event-stream", headers=headers)
        return JSONResponse(await self._collect(stream, first, request_id, chat=chat), headers=headers)

    async def _next_chunk(self, stream: Any) -> StreamChunk | None:
        """The next chunk of the engine stream, or None at its end; errors become ``OpenAIError``."""
        overload: str | None = None
        try:
            chunk: StreamChunk = await stream.__anext__()
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
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            unavailable = self._overload_error(f"engine replica unavailable: {type(exc).__name__}")
            raise ReplicaUnavailableError(
                unavailable.message,
                status_code=unavailable.status_code,
                error_type=unavailable.error_type,
                code=unavailable.code,
                headers=unavailable.headers,
            ) from None
        if overload is not None:
            raise self._overload_error(overload)
        if chunk.error is not None:
            err = chunk.error
            raise OpenAIError(
                err["message"], status_code=chunk.status_code, error_type=err["type"], param=err.get("param")
            )
        return chunk

    def _overload_error(self, message: str) -> OpenAIError:
        ingress = self._config.ingress
        return OpenAIError(
            f"server overloaded, retry later ({message})",
            status_code=ingress.overload_status_code,
            error_type="server_overloaded",
            code="overloaded",
            headers={"Retry-After": str(max(1, round(ingress.retry_after_s)))},
        )

    async def _collect(self, stream: Any, first: StreamChunk | None, request_id: str, *, chat: bool) -> dict:
        text_parts: list[str] = []
        logprobs: list[dict] = []
        last = first
        chunk = first
        try:
            while chunk is not None:
                text_parts.append(chunk.new_text)
                logprobs.extend(chunk.new_logprobs or [])
                last = chunk
                if chunk.finished:
                    break
                chunk = await self._next_chunk(stream)
        finally:
            # Also runs when the client disconnects (this task is cancelled): abort in the engine.
            _cancel_quietly(stream)
        text = "".join(text_parts)
        finish_reason = last.finish_reason if last is not None else "abort"
        usage = _usage(last)
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": self._chat_logprobs(logprobs) if logprobs else None,
                "finish_reason": finish_reason,
            }
            obj = "chat.completion"
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": self._completion_logprobs(logprobs) if logprobs else None,
                "finish_reason": finish_reason,
            }
            obj = "text_completion"
        return {
            "id": request_id,
            "object": obj,
            "created": int(time.time()),
            "model": self._model_id,
            "choices": [choice],
            "usage": usage,
        }

    async def _sse(
        self, stream: Any, first: StreamChunk | None, request_id: str, *, chat: bool, include_usage: bool
    ) -> AsyncIterator[str]:
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(choices: list[dict], usage: dict | None = None) -> str:
            payload: dict[str, Any] = {
                "id": request_id,
                "object": obj,
                "created": created,
                "model": self._model_id,
                "choices": choices,
            }
            if include_usage:
                payload["usage"] = usage
            return f"data: {json.dumps(payload)}\n\n"

        last = first
        chunk = first
        try:
            if chat:
                yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
            while chunk is not None:
                last = chunk
                lp = chunk.new_logprobs or []
                if chunk.new_text or chunk.finished:
                    finish = chunk.finish_reason if chunk.finished else None
                    if chat:
                        delta = {"content": chunk.new_text} if chunk.new_text else {}
                        choice = {"index": 0, "delta": delta, "logprobs": self._chat_logprobs(lp) if lp else None, "finish_reason": finish}
                    else:
                        choice = {"index": 0, "text": chunk.new_text, "logprobs": self._completion_logprobs(lp) if lp else None, "finish_reason": finish}
                    yield event([choice])
                if chunk.finished:
                    break
                try:
                    chunk = await self._next_chunk(stream)
                except OpenAIError as exc:
                    # Headers are gone: report in-band as OpenAI's servers do, then end the stream.
                    yield f"data: {json.dumps(exc.body())}\n\n"
                    return
            if include_usage:
                yield event([], _usage(last))
            yield "data: [DONE]\n\n"
        finally:
            # Client disconnect cancels this generator: cancelling the handle call aborts the request
            # in the engine replica, which frees its batch slot and KV pages.
            _cancel_quietly(stream)

    # ---- helpers -------------------------------------------------------------------------------------

    def _tokenize(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        try:
            # JSON may carry lone surrogates (valid escapes, not valid text): the tokenizer cannot take them.
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise OpenAIError(f"the text is not valid Unicode: {exc.reason}", param=param) from None
        return list(self._tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

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
            self._model_limits = (int(info["max_model_len"]), int(info["max_request_tokens"]))
        return self._model_limits

    def _token_str(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id])

    def _chat_logprobs(self, entries: list[dict]) -> dict:
        content = []
        for e in entries:
            token = self._token_str(e["token_id"])
            content.append(
                {
                    "token": token,
                    "logprob": float(e["logprob"]),
                    "bytes": list(token.encode("utf-8")),
                    "top_logprobs": [
                        {"token": (t := self._token_str(tid)), "logprob": float(lp), "bytes": list(t.encode("utf-8"))}
                        for tid, lp in e.get("top", [])
                    ],
                }
            )
        return {"content": content}

    def _completion_logprobs(self, entries: list[dict]) -> dict:
        tokens = [self._token_str(e["token_id"]) for e in entries]
        return {
            "tokens": tokens,
            "token_logprobs": [float(e["logprob"]) for e in entries],
            "top_logprobs": [{self._token_str(tid): float(lp) for tid, lp in e.get("top", [])} for e in entries],
            "text_offset": [],
        }
