"""asyncio frontend of the engine: tokenization and per-request streams over an engine core that steps on its own.

The core (``engine.engine_core.EngineCore``) runs in a process of its own or in a thread of this one
(``EngineConfig.engine_process``, see ``engine.core_client``); either way it never waits for a consumer, and every
step's outputs reach this frontend in one batch, which it sorts into the requests' queues.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from engine.config import EngineConfig
from engine.core_client import EngineCoreClient, InProcessCore, start_core
from engine.core_protocol import SHUT_DOWN
from engine.errors import EngineDeadError, InvalidRequestError
from engine.executor import ExecutorFactory
from engine.llm_engine import LLMEngine
from engine.outputs import EngineStats, RequestOutput
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    """Where one request's outputs go: a queue owned by the consumer's event loop. ``num_unfinished``: sequences
    (``params.n``) whose final output has not come yet."""

    loop: asyncio.AbstractEventLoop
    prompt_token_ids: list[int]
    num_unfinished: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput | BaseException]]) -> None:
    for q, item in items:
        q.put_nowait(item)


class _RequestStreams:
    """The requests being streamed, by id: the one owner of their queues, and the core's outbox (its calls come
    from the core's thread, or from the thread reading the core process's events).

    It also keeps when the core was last heard from (a step, a refusal), for the watchdog in
    ``AsyncLLMEngine.failure``: that clock matters only while the core owes outputs (streams are open, or requests
    their consumers gave up on have not had their final outputs yet), so the first request of a core that owes none
    starts it afresh. Not merely the first stream opened: the consumers of a stuck core's requests may all have given
    up, their aborts unread, and the clock must run on for the next one.
    """

    def __init__(self) -> None:
        self._streams: dict[str, _Stream] = {}
        self._abandoned: dict[str, int] = {}  # request id -> sequences whose final output the core still owes
        self._lock = threading.Lock()  # callers' event loops and the core's thread
        self._last_heard_s = time.monotonic()
        self.dead_error: EngineDeadError | None = None
        self.stats: EngineStats | None = None

    def open(self, request_id: str, stream: _Stream) -> None:
        with self._lock:
            if self.dead_error is not None:
                raise EngineDeadError(str(self.dead_error)) from self.dead_error
            if request_id in self._streams:
                raise InvalidRequestError(f"request_id {request_id!r} is already in use", "request_id")
            if not self._streams and not self._abandoned:  # it owed nothing: its silence until now is no stall
                self._last_heard_s = time.monotonic()
            self._streams[request_id] = stream

    def close(self, request_id: str, sent: bool = True) -> None:
        """The consumer is gone: its request's later outputs go nowhere. ``sent``: the core has the request (and
        owes its final outputs, now that it is told to abort it)."""
        with self._lock:
            stream = self._streams.pop(request_id, None)
            if sent and stream is not None and stream.num_unfinished:
                self._abandoned[request_id] = stream.num_unfinished

    def step(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        """One step's outputs: into their requests' queues, one wake-up per consumer event loop."""
        self.stats = stats
        by_loop: dict[asyncio.AbstractEventLoop, list] = collections.defaultdict(list)
        with self._lock:
            self._last_heard_s = time.monotonic()
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    if out.finished and out.request_id in self._abandoned:
                        self._abandoned[out.request_id] -= 1
                        if not self._abandoned[out.request_id]:
                            del self._abandoned[out.request_id]
                    continue
                if out.finished:
                    stream.num_unfinished -= 1
                    if stream.num_unfinished == 0:
                        del self._streams[out.request_id]
                if out.prompt_token_ids is None:  # from a core process: the prompt stays here
                    out.prompt_token_ids = stream.prompt_token_ids
                by_loop[stream.loop].append((stream.queue, out))
        for loop, items in by_loop.items():
            _call_soon(loop, items)

    def rejected(self, request_id: str, error: BaseException) -> None:
        with self._lock:
            self._last_heard_s = time.monotonic()
            stream = self._streams.pop(request_id, None)
            self._abandoned.pop(request_id, None)
        if stream is not None:
            _call_soon(stream.loop, [(stream.queue, error)])

    def silence(self) -> tuple[int, float]:
        """How many requests the core owes outputs (streams open, and requests given up on whose final outputs have
        not come), and the seconds since it was last heard from (or since the first of them came, if later)."""
        with self._lock:
            return len(self._streams) + len(self._abandoned), time.monotonic() - self._last_heard_s

    def dead(self, message: str) -> None:
        with self._lock:
            if self.dead_error is None:
                self.dead_error = EngineDeadError(message)
                if message != SHUT_DOWN:
                    logger.error("engine core died: %s", message)
            streams, self._streams = self._streams, {}
            self._abandoned.clear()
        for stream in streams.values():
            _call_soon(stream.loop, [(stream.queue, self.dead_error)])


class AsyncLLMEngine:
    """Streams requests' outputs to asyncio consumers while the engine core steps without waiting for them.

    Args:
        config: the engine's config; ``engine_process`` picks where the core runs.
        engine: an already built ``LLMEngine`` to step in a thread of this process (tests).
        executor_factory: ``LLMEngine``'s, for a core in this process (tensor parallelism).

    Failures: a request's own problem (bad parameters, a prompt that can never fit, an error while processing its
    token) is raised to that request's consumer only. If the core dies (a step failed, its process exited), every
    consumer, present and future, gets ``EngineDeadError``; so they do once :meth:`failure` finds the core stuck
    (no step finished in ``config.step_timeout_s`` with requests open).
    """

    def __init__(
        self,
        config: EngineConfig | None = None,
        engine: LLMEngine | None = None,
        executor_factory: ExecutorFactory | None = None,
    ) -> None:
        from engine.tokenizer import load_tokenizer

        if engine is not None:
            config = engine.config
        elif config is None:
            config = EngineConfig()
        self._streams = _RequestStreams()
        self._step_timeout_s = config.step_timeout_s
        self._core: EngineCoreClient
        if engine is not None:
            self._core = InProcessCore(self._streams, engine=engine)
        else:
            self._core = start_core(self._streams, config, executor_factory)
        info = self._core.info
        self._streams.stats = info.stats
        self.max_model_len = info.max_model_len
        self.max_request_tokens = info.max_request_tokens
        self.tokenizer = engine.tokenizer if engine is not None else load_tokenizer(config.model)

    # ---- callers (any event loop) ----------------------------------------------------------------------------

    @property
    def is_dead(self) -> bool:
        return self._streams.dead_error is not None

    async def stream(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[list[RequestOutput]]:
        """Stream a request's outputs, each item every output ready for it at that moment (in order, the ``n``
        sequences' interleaved, told apart by ``index``), until the final output of each sequence.

        Leaving the loop early or cancelling the consuming task aborts the request and frees its slots.

        Raises:
            InvalidRequestError / PromptTooLongError: the request was rejected.
            EngineDeadError: the engine failed or was shut down.
            Any exception the request failed with inside the engine.
        """
        params = params if params is not None else SamplingParams()
        params.validate()
        prompt_token_ids = self._tokenize(prompt)
        request_id = request_id if request_id is not None else uuid.uuid4().hex
        stream = _Stream(asyncio.get_running_loop(), prompt_token_ids, params.n)
        self._streams.open(request_id, stream)
        try:
            self._core.add(request_id, prompt_token_ids, params)
        except BaseException:
            self._streams.close(request_id, sent=False)
            raise
        num_unfinished = params.n
        try:
            while num_unfinished:
                batch = [await stream.queue.get()]
                while not stream.queue.empty():
                    batch.append(stream.queue.get_nowait())
                outputs = []
                for item in batch:
                    if isinstance(item, BaseException):
                        num_unfinished = 0
                        raise item
                    num_unfinished -= item.finished
                    if item.error is not None:  # its other sequences, if any, are aborted below
                        raise item.error
                    outputs.append(item)
                yield outputs
        finally:
            if num_unfinished:
                self._core.abort(request_id)
                self._streams.close(request_id)

    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """:meth:`stream`, one output at a time."""
        outputs = self.stream(prompt, params, request_id)
        try:
            async for batch in outputs:
                for out in batch:
                    yield out
        finally:
            await outputs.aclose()

    async def abort(self, request_id: str) -> None:
        """Abort a request (no-op if unknown or finished); its consumer gets a final "abort" output."""
        self._core.abort(request_id)

    def stats(self) -> EngineStats:
        """Engine statistics as of the last step (a snapshot; safe from any thread)."""
        return self._streams.stats

    @property
    def core_pid(self) -> int:
        """The process the engine core steps in (this one's when it runs in a thread)."""
        return self._core.pid

    def failure(self) -> Exception | None:
        """Why this engine cannot serve (its core died, or a tensor-parallel worker did while idle, or it is stuck),
        or None.

        Stuck: requests are open and no step has finished for longer than ``step_timeout_s`` (a hung kernel or
        collective, a stopped core process). Nothing else would notice, since a step that never returns raises
        nothing: the engine is failed here, so that its requests end with ``EngineDeadError`` at once (the ingress
        may route them again) and the health check that calls this has Serve replace the replica; a core process is
        killed (``abandon``), so that its device memory is free for the replacement. Serve's health
        checks and routing reports call this often enough that the watchdog needs no thread of its own.
        """
        if self._streams.dead_error is not None:
            return self._streams.dead_error
        if self._step_timeout_s is not None:
            num_open, silent_s = self._streams.silence()
            if num_open and silent_s > self._step_timeout_s:
                self._streams.dead(
                    f"no engine step finished in {silent_s:.0f} s (step_timeout_s {self._step_timeout_s:g}) with "
                    f"{num_open} request{'s' if num_open > 1 else ''} in it: the engine core is stuck"
                )
                self._core.abandon()
                return self._streams.dead_error
        try:
            self._core.check_health()
        except Exception as exc:  # noqa: BLE001 - whatever the core raises is the failure to report
            return exc
        return None

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the core, fail outstanding requests with ``EngineDeadError`` and free the KV cache."""
        self._core.shutdown(timeout_s)
        self._streams.dead(SHUT_DOWN)

    # ---- internals ------------------------------------------------------------------------------------------

    def _tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        """A text prompt's tokens (special tokens added, BOS where the model uses one); token ids as given (the
        core checks them against the vocabulary)."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt must not be empty", "prompt")
            return list(self.tokenizer.encode(prompt))
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise InvalidRequestError("prompt must be a string or a list of token ids", "prompt")
        return list(prompt)


def _call_soon(loop: asyncio.AbstractEventLoop, items: list) -> None:
    try:
        loop.call_soon_threadsafe(_put_all, items)
    except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
        pass
