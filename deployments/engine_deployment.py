"""The engine deployment: each replica owns one ``AsyncLLMEngine`` and streams its outputs.

The engine core steps in a process of its own (``engine_process``, the default) or in a thread of the replica,
so the replica's event loop only awaits per-request queues and stays free to accept requests, answer health checks
and routing-stats calls. Each item streamed to the ingress holds everything ready for the request at that moment
(one ``StreamChunk`` per choice), so Ray moves one item per request per wake-up, not one per token.
The class is plain Python; :func:`deployments.app.build_app` turns it into a Serve deployment with
the options of the YAML config (replicas, resources, the page-aware router).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray.serve.context import _get_serve_request_context

from deployments.engine_metrics import EngineMetrics
from deployments.routing_hint import RoutingHint, pages_for_tokens
from deployments.routing_report import RoutingReport

logger = logging.getLogger("ray.serve")

# A StreamChunk error's type when the replica's engine is dead: the ingress routes the request again if nothing
# reached the client yet.
ENGINE_DEAD = "engine_dead"


@dataclass
class _InflightRequest:
    """What the replica knows of a request it accepted, to report pages it will still claim."""

    serve_request_id: str  # Serve's id of the call, the one the router knows it by
    num_prompt_tokens: int
    max_tokens: int
    # Per sequence (OpenAI's n): None until its first token; then its prompt's and outputs' pages are mapped and
    # counted as used. One tuple, replaced whole, so that a reader in another thread never sees a half update.
    num_output_tokens: tuple[int | None, ...] = (None,)
    # The routing hint's keys of a few of the prompt's blocks: a later request whose prompt shares them maps those
    # blocks from this one's (see RoutingHint.prefix_probe).
    prefix_probe: tuple[tuple[int, int], ...] = ()


@dataclass
class StreamChunk:
    """The new part of a request's choice ``index`` (one or more of its ``RequestOutput``s merged); the replica
    streams lists of them to the ingress, at most one per choice in a list, the choices interleaved.

    ``error`` is set (and nothing else is meaningful) when the request failed: the ingress turns it
    into an OpenAI error body with ``status_code``.
    """

    new_text: str = ""
    index: int = 0
    num_new_tokens: int = 0
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    new_logprobs: list[dict] | None = None
    error: dict | None = None
    status_code: int = 200
    replica: str = ""


class EngineDeployment:
    """One engine replica.

    Args:
        engine_config: dict for ``EngineConfig.from_dict`` (see ``AppConfig.engine_config_dict``).
        model_id: the served model name (metrics tag).
    """

    def __init__(self, engine_config: dict[str, Any], model_id: str) -> None:
        from deployments.tp_workers import make_executor_factory
        from engine.async_engine import AsyncLLMEngine
        from engine.config import EngineConfig

        self._replica_tag = _replica_tag()
        # tensor_parallel_size > 1: this replica is rank 0; ranks 1.. are Ray actors in its placement group.
        self._engine = AsyncLLMEngine(
            EngineConfig.from_dict(dict(engine_config)),
            executor_factory=make_executor_factory(name_prefix=f"{self._replica_tag}-tp"),
        )
        self._model_id = model_id
        self._metrics = EngineMetrics(model_id, self._replica_tag)
        # Written by generate() on the replica's event loop, read by record_routing_stats() in Serve's
        # thread pool: every access goes through the lock.
        self._inflight: dict[str, _InflightRequest] = {}
        self._inflight_lock = threading.Lock()
        self._num_routing_reports = 0
        self._pages_per_token_block = self._engine.stats().pages_per_token_block
        self._max_request_tokens = self._engine.max_request_tokens
        self._gauge_task: asyncio.Task | None = None

    # ---- requests -----------------------------------------------------------------------------------

    async def generate(
        self, routing_hint: RoutingHint, prompt_token_ids: list[int], sampling_params: Any, request_id: str
    ) -> AsyncIterator[list[StreamChunk]]:
        """Stream a request's outputs (of each of its ``sampling_params.n`` choices) until the last choice
        finishes, each item everything ready at that moment, one chunk per choice. Cancelling the consumer (client
        gone) aborts it in the engine. A failure is one chunk with ``error`` set.

        Args:
            routing_hint: read by the router; here only for page accounting.
            prompt_token_ids: the tokenized (chat-templated) prompt.
            sampling_params: an ``engine.sampling_params.SamplingParams``.
            request_id: unique id (also the engine's request id).
        """
        from engine.errors import EngineDeadError, InvalidRequestError

        self._ensure_gauge_task()
        arrival_s = time.monotonic()
        num_sequences = sampling_params.n
        last_token_s: list[float | None] = [None] * num_sequences  # per choice
        inflight = _InflightRequest(
            _serve_request_id(),
            routing_hint.num_prompt_tokens,
            routing_hint.max_tokens,
            num_output_tokens=(None,) * num_sequences,
            prefix_probe=routing_hint.prefix_probe,
        )
        with self._inflight_lock:
            self._inflight[request_id] = inflight
        num_finished = 0
        aborted = False
        try:
            async for outputs in self._engine.stream(prompt_token_ids, sampling_params, request_id):
                now_s = time.monotonic()
                chunks: dict[int, StreamChunk] = {}
                counts = list(inflight.num_output_tokens)
                for out in outputs:
                    num_new = len(out.new_token_ids)
                    if num_new:
                        previous_s = last_token_s[out.index]
                        if previous_s is None:
                            if all(s is None for s in last_token_s):  # the request's first token, its prompt's KV done
                                self._metrics.time_to_first_token.observe(now_s - arrival_s)
                                self._metrics.prompt_tokens.inc(out.num_prompt_tokens)
                        else:
                            gap_s = (now_s - previous_s) / num_new
                            for _ in range(num_new):
                                self._metrics.inter_token_latency.observe(gap_s)
                        self._metrics.generation_tokens.inc(num_new)
                        last_token_s[out.index] = now_s
                        counts[out.index] = out.num_output_tokens
                    if out.finished:
                        num_finished += 1
                        aborted = aborted or out.finish_reason == "abort"
                        if num_finished == num_sequences:
                            if not aborted:
                                self._metrics.request_success.inc()
                            self._metrics.e2e_request_latency.observe(now_s - arrival_s)
                    _merge(chunks, out, self._replica_tag)
                inflight.num_output_tokens = tuple(counts)
                yield list(chunks.values())
        except InvalidRequestError as exc:
            yield [StreamChunk(error=_error_body(exc.message, "invalid_request_error", exc.param), status_code=400)]
        except EngineDeadError as exc:
            yield [StreamChunk(error=_error_body(str(exc), ENGINE_DEAD, None), status_code=503)]
        finally:
            with self._inflight_lock:
                self._inflight.pop(request_id, None)
            if num_finished < num_sequences:
                # Client disconnect cancels this generator: free the request's slots and pages now.
                await self._engine.abort(request_id)

    async def model_info(self) -> dict[str, Any]:
        """What the ingress needs to validate requests.

        ``max_model_len``: most tokens (prompt + output) a request may hold in a slot.
        ``max_request_tokens``: the same, also bounded by the whole physical page pool, so that the
        ingress can reject (or cap the default ``max_tokens`` of) a request that could never run.
        ``prefix_caching``: ``block_tokens`` and ``seed`` of the engine's prefix keys (None when it caches no
        prefixes): the ingress hashes prompts with them for the router's prefix affinity.
        """
        summary = self._engine.stats().prefix_summary
        return {
            "max_model_len": int(self._engine.max_model_len),
            "max_request_tokens": self._max_request_tokens,
            "model_id": self._model_id,
            "prefix_caching": {"block_tokens": summary.block_tokens, "seed": summary.seed} if summary else None,
        }

    async def engine_stats(self) -> dict[str, Any]:
        """``EngineStats.as_dict()`` plus the replica tag, its pid and its engine core's, and their resident memory
        (debugging, soak tests)."""
        stats = dict(self._engine.stats().as_dict())
        stats["replica"] = self._replica_tag
        with self._inflight_lock:
            stats["num_inflight"] = len(self._inflight)
        stats["pid"] = os.getpid()
        stats["core_pid"] = core_pid = self._engine.core_pid
        stats["rss_bytes"] = _rss_bytes("self") + (_rss_bytes(str(core_pid)) if core_pid != os.getpid() else 0)
        return stats

    # ---- Serve hooks ----------------------------------------------------------------------------------

    def record_routing_stats(self) -> dict[str, Any]:
        """Called by Serve every ``request_routing_stats_period_s``: this replica's ``RoutingReport`` (as a dict),
        read by ``PageAwareRequestRouter``."""
        stats = self._engine.stats().as_dict()
        self._metrics.record_engine_stats(stats)
        with self._inflight_lock:
            inflight = list(self._inflight.values())
        self._num_routing_reports += 1
        healthy = self._engine_failure() is None
        tokens_per_page = float(stats["tokens_per_page"])
        num_free_pages = int(stats["num_free_pages"]) + int(stats.get("num_reclaimable_pages", 0))
        return RoutingReport(
            healthy=healthy,
            # Not the dead engine's last snapshot: that would keep attracting requests that fail at once.
            num_free_pages=num_free_pages if healthy else 0,
            num_total_pages=int(stats["num_total_pages"]),
            tokens_per_page=tokens_per_page,
            pages_per_token_block=self._pages_per_token_block,
            # Preempted requests' pages are back in the pool, but a started request counts only as what it lacks.
            num_reserved_pages=self._reserved_pages(inflight, tokens_per_page)
            + int(stats.get("num_preempted_pages", 0)),
            num_running=int(stats["num_running"]),
            num_waiting=int(stats["num_waiting"]),
            num_free_slots=int(stats.get("num_free_slots", 0)) if healthy else 0,
            num_preemptions=int(stats.get("num_preemptions", 0)),
            accepted_request_ids=tuple(req.serve_request_id for req in inflight),
            report_seq=self._num_routing_reports,
            prefix_keys=tuple(stats["prefix_summary"]["keys"]) if stats["prefix_summary"] else (),
            replica=self._replica_tag,
        ).as_dict()

    def check_health(self) -> None:
        """Serve health check: a dead engine makes the replica unhealthy so Serve replaces it."""
        failure = self._engine_failure()
        if failure is not None:
            raise failure

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            try:
                engine.shutdown()
            except Exception:  # noqa: BLE001 - best effort at interpreter/actor teardown
                pass

    # ---- internals ------------------------------------------------------------------------------------

    def _engine_failure(self) -> Exception | None:
        """Why this replica cannot serve (its engine core died, or a tensor-parallel worker did while idle: fail
        now, not at the next request), or None."""
        return self._engine.failure()

    def _reserved_pages(self, inflight: list[_InflightRequest], tokens_per_page: float) -> int:
        """Pages the accepted requests (in arrival order) will still take from the pool. A prompt's blocks that an
        earlier one of them shares count once: the later request maps them from the earlier one's (whose first
        token may not have come yet), as the router counts a burst on one system prompt."""
        covering: set[int] = set()
        reserved = 0
        for req in inflight:
            covered = max((n for n, key in req.prefix_probe if key in covering), default=0)
            reserved += self._pages_still_claimed(req, tokens_per_page, covered)
            covering.update(key for _, key in req.prefix_probe)
        return reserved

    def _pages_still_claimed(self, req: _InflightRequest, tokens_per_page: float, covered_tokens: int = 0) -> int:
        """What ``req`` will still take: each sequence not started its whole footprint less the first
        ``covered_tokens`` prompt tokens (blocks another request maps first), each started one what it lacks."""
        final = pages_for_tokens(req.num_prompt_tokens + req.max_tokens, tokens_per_page, self._pages_per_token_block)
        shared = pages_for_tokens(
            min(covered_tokens, req.num_prompt_tokens), tokens_per_page, self._pages_per_token_block
        )
        claimed = 0
        for num_output_tokens in req.num_output_tokens:  # each sequence's
            if num_output_tokens is None:
                claimed += final - shared
                continue
            held = pages_for_tokens(
                req.num_prompt_tokens + num_output_tokens, tokens_per_page, self._pages_per_token_block
            )
            claimed += max(0, final - held)
        return claimed

    def _ensure_gauge_task(self) -> None:
        # Gauges also move between routing-stats calls so a scrape sees fresh running/waiting counts.
        if self._gauge_task is None or self._gauge_task.done():
            self._gauge_task = asyncio.get_running_loop().create_task(self._publish_gauges())

    async def _publish_gauges(self) -> None:
        while True:
            try:
                self._metrics.record_engine_stats(self._engine.stats().as_dict())
            except Exception:  # noqa: BLE001 - metrics must never take the replica down
                logger.exception("failed to publish engine gauges")
            await asyncio.sleep(1.0)


def _merge(chunks: dict[int, StreamChunk], out: Any, replica: str) -> None:
    """Add ``out`` (a ``RequestOutput``) to the chunk of its choice in ``chunks``: one chunk per choice per item."""
    chunk = chunks.get(out.index)
    if chunk is None:
        chunk = chunks[out.index] = StreamChunk(index=out.index, replica=replica)
    chunk.new_text += out.new_text
    chunk.num_new_tokens += len(out.new_token_ids)
    chunk.finished = out.finished
    chunk.finish_reason = out.finish_reason
    chunk.num_prompt_tokens = out.num_prompt_tokens
    chunk.num_output_tokens = out.num_output_tokens
    chunk.num_cached_tokens = out.num_cached_tokens
    if out.new_logprobs is not None:
        chunk.new_logprobs = (chunk.new_logprobs or []) + out.new_logprobs


def _error_body(message: str, error_type: str, param: str | None) -> dict:
    return {"message": message, "type": error_type, "param": param, "code": None}


def _serve_request_id() -> str:
    """Serve's internal id of the call being handled (what the router sees as ``internal_request_id``);
    empty outside Serve. Ray exposes it only through its private request context."""
    return _get_serve_request_context()._internal_request_id


def _replica_tag() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_tag
    except Exception:  # noqa: BLE001 - outside Serve (unit use) there is no replica context
        return f"local-{uuid.uuid4().hex[:8]}"


def _rss_bytes(pid: str) -> int:
    """Resident set size of process ``pid`` ("self": this one) (Linux /proc; 0 where unavailable)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
