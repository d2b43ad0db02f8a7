"""asyncio front-end: the engine steps in its own thread; callers stream outputs with ``async for``."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from engine.config import EngineConfig
from engine.errors import EngineDeadError, InvalidRequestError
from engine.llm_engine import LLMEngine
from engine.outputs import EngineStats, RequestOutput
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    """Where one request's outputs go: a queue owned by the consumer's event loop. ``num_unfinished``: sequences
    (``params.n``) whose final output has not come yet."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    num_unfinished: int = 1

    def put(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            pass


class AsyncLLMEngine:
    """Runs an :class:`LLMEngine` in a dedicated thread so that stepping (forward, sampling, page
    mapping) never blocks the caller's event loop.

    Everything that touches the ``LLMEngine`` (tokenization included) happens on that thread; callers
    talk to it through a command queue, and outputs come back through ``loop.call_soon_threadsafe``
    into a per-request ``asyncio.Queue``.

    Failures: a request's own problem (bad parameters, a prompt that can never fit, an error while
    processing its token) is raised to that request's consumer only. If a step itself fails, the
    engine is dead: every consumer, present and future, gets ``EngineDeadError``.
    """

    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | None = None) -> None:
        self.engine = engine if engine is not None else LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_model_len
        self.max_request_tokens = self.engine.max_request_tokens
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._dead_error: EngineDeadError | None = None
        self._stats = self.engine.stats()
        self._thread = threading.Thread(target=self._run, name="llm-engine-loop", daemon=True)
        self._thread.start()

    # ---- caller side (any event loop) ------------------------------------------------------------------------

    @property
    def is_dead(self) -> bool:
        return self._dead_error is not None

    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs until its final one (``finished=True``); with ``params.n`` > 1, those of its
        ``n`` sequences (told apart by ``index``), interleaved, until the final one of each.

        Leaving the loop early or cancelling the consuming task aborts the request and frees its slot.

        Raises:
            InvalidRequestError / PromptTooLongError: the request was rejected.
            EngineDeadError: the engine failed or was shut down.
            Any exception the request failed with inside the engine.
        """
        if self._dead_error is not None:
            raise EngineDeadError(str(self._dead_error)) from self._dead_error
        params = params if params is not None else SamplingParams()
        params.validate()
        request_id = request_id if request_id is not None else uuid.uuid4().hex
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), params.n)
        self._commands.put(("add", request_id, prompt, params, stream))
        num_unfinished = params.n
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                num_unfinished -= item.finished
                finished = num_unfinished == 0
                if item.error is not None:  # its other sequences, if any, are aborted below
                    raise item.error
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._commands.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        """Abort a request (no-op if unknown or finished); its consumer gets a final "abort" output."""
        self._commands.put(("abort", request_id))

    def stats(self) -> EngineStats:
        """Engine statistics as of the last step (a snapshot; safe from any thread)."""
        return self._stats

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the loop, fail outstanding requests with ``EngineDeadError`` and free the KV cache."""
        if self._thread.is_alive():
            self._commands.put(("stop",))
            self._thread.join(timeout_s)

    # ---- engine thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                # Block only when idle; while requests run, pick up new commands between steps.
                if not self._handle_commands(block=not engine.has_unfinished()):
                    break
                if not engine.has_unfinished():
                    continue
                try:
                    outputs = engine.step()
                except Exception as exc:
                    logger.exception("engine step failed; the engine is dead")
                    self._die(EngineDeadError(f"engine step failed: {exc!r}"), exc)
                    self._serve_dead()
                    return
                for out in outputs:
                    stream = self._streams.get(out.request_id)
                    if stream is None:
                        continue
                    if out.finished:
                        stream.num_unfinished -= 1
                        if stream.num_unfinished == 0:
                            del self._streams[out.request_id]
                    stream.put(out)
                self._stats = engine.stats()
        except BaseException as exc:  # a bug in the loop itself: don't leave consumers hanging
            logger.exception("engine loop crashed")
            self._die(EngineDeadError(f"engine loop crashed: {exc!r}"), exc)
            return
        self._die(EngineDeadError("the engine was shut down"), None)
        try:
            engine.shutdown()
        except Exception:
            logger.exception("engine shutdown failed")

    def _handle_commands(self, block: bool) -> bool:
        """Apply queued commands; False once asked to stop."""
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            kind = command[0]
            if kind == "stop":
                return False
            if kind == "add":
                _, request_id, prompt, params, stream = command
                if request_id in self._streams:
                    stream.put(InvalidRequestError(f"request_id {request_id!r} is already in use", "request_id"))
                    continue
                try:
                    self.engine.add_request(request_id, prompt, params)
                except Exception as exc:
                    stream.put(exc)
                    continue
                self._streams[request_id] = stream
            elif kind == "abort":
                self.engine.abort(command[1])

    def _die(self, error: EngineDeadError, cause: BaseException | None) -> None:
        error.__cause__ = cause
        self._dead_error = error
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.put(error)

    def _serve_dead(self) -> None:
        """After a fatal failure: answer every later request with the error until shut down."""
        while True:
            command = self._commands.get()
            if command[0] == "stop":
                break
            if command[0] == "add":
                command[4].put(self._dead_error)
        try:
            self.engine.shutdown()
        except Exception:
            logger.exception("engine shutdown failed")
