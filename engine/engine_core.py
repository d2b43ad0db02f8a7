"""The engine core: a busy step loop over one ``LLMEngine`` that never waits for its consumers.

Commands (add, abort, stop) are picked up between steps; each step's outputs leave in one batch through a
:class:`~engine.core_protocol.CoreOutbox`. A request with a JSON schema has its grammar compiled in a thread of
the core (a schema can take a good part of a second; a few compile at once, each within a deadline) and joins the
engine once it is ready: the other requests' steps go on meanwhile. The same loop runs in a thread of the frontend's process
(``engine.core_client.InProcessCore``) or alone in a process of its own (``python -m engine.engine_core``, started
by ``engine.core_client.ProcessCore``), where the commands arrive and the batches leave over ZeroMQ as msgpack.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from engine.core_protocol import (
    ADD,
    SHUT_DOWN,
    STOP,
    CoreOutbox,
    decode_command,
    encode_dead,
    encode_rejected,
    encode_step,
)
from engine.errors import InvalidRequestError
from engine.llm_engine import LLMEngine
from engine.outputs import EngineStats, RequestOutput

logger = logging.getLogger(__name__)

# A core process whose frontend is gone exits; checked this often while idle, and between steps.
PARENT_CHECK_PERIOD_S = 1.0
# While grammars compile and nothing else runs, the loop looks for new commands this often.
COMPILE_POLL_S = 0.005
# Grammars compile this many at a time (xgrammar's compiler is thread-safe), each in a thread of its own: one slow
# schema does not hold up the others.
GRAMMAR_COMPILE_THREADS = 4
# A schema whose compile has run this long fails its request. The compile cannot be stopped: it runs on, unused, in
# its daemon thread, and no longer counts against GRAMMAR_COMPILE_THREADS.
GRAMMAR_COMPILE_TIMEOUT_S = 30.0
# While only grammars compile no step finishes: the loop says it is alive this often (an empty step), for the
# frontend's watchdog (``EngineConfig.step_timeout_s``) takes a core silent with requests open for a stuck one.
HEARTBEAT_PERIOD_S = 1.0


@dataclass
class _Compiling:
    """A request waiting for its grammars (``future``: ``LLMEngine.compile_grammars``'s result)."""

    prompt_token_ids: list[int]
    params: object
    arrival_time: float
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    started_s: float | None = None  # when its compile began (time.monotonic()); None while it waits for a thread


class EngineCore:
    """Steps ``engine`` while it has work, applies commands between steps, sends each step's outputs at once.

    Args:
        engine: the engine, driven by this loop only.
        next_commands: ``next_commands(block)`` -> the commands queued now (waiting for one when ``block``); an
            empty list when there are none, or when a blocking wait timed out.
        outbox: where outputs, refusals and the death notice go.
    """

    def __init__(self, engine: LLMEngine, next_commands: Callable[[bool], list[tuple]], outbox: CoreOutbox) -> None:
        self.engine = engine
        self._next_commands = next_commands
        self._outbox = outbox
        self._compiling: dict[str, _Compiling] = {}

    def run(self) -> None:
        """Until a stop command, or a failure: then the outbox hears ``dead`` and the engine is shut down."""
        engine = self.engine
        last_heartbeat_s = time.monotonic()
        try:
            while self._apply(self._next_commands(not engine.has_unfinished() and not self._compiling)):
                self._admit_compiled()
                if not engine.has_unfinished():
                    if self._compiling:
                        concurrent.futures.wait(
                            [c.future for c in self._compiling.values()],
                            timeout=COMPILE_POLL_S,
                            return_when=concurrent.futures.FIRST_COMPLETED,
                        )
                        if time.monotonic() - last_heartbeat_s >= HEARTBEAT_PERIOD_S:
                            self._outbox.step([], self._stats())
                            last_heartbeat_s = time.monotonic()
                    continue
                try:
                    outputs = engine.step()
                except Exception as exc:
                    logger.exception("engine step failed; the engine is dead")
                    self._outbox.dead(f"engine step failed: {exc!r}")
                    return self._shutdown()
                self._outbox.step(outputs, self._stats())
        except BaseException as exc:  # a bug in the loop itself: don't leave consumers hanging
            logger.exception("engine loop crashed")
            self._outbox.dead(f"engine loop crashed: {exc!r}")
            return self._shutdown()
        self._outbox.dead(SHUT_DOWN)
        self._shutdown()

    def _apply(self, commands: list[tuple]) -> bool:
        """Apply ``commands`` in order; False once asked to stop."""
        for command in commands:
            kind = command[0]
            if kind == STOP:
                return False
            if kind == ADD:
                _, request_id, prompt_token_ids, params = command
                if request_id in self._compiling:
                    self._outbox.rejected(
                        request_id, InvalidRequestError(f"request_id {request_id!r} is already in use", "request_id")
                    )
                    continue
                if params.json_schema is not None:
                    try:  # everything but the schema is refused now, not after the compile
                        self.engine.check_request(request_id, prompt_token_ids, params)
                    except Exception as exc:
                        self._outbox.rejected(request_id, exc)
                        continue
                    self._compile(request_id, prompt_token_ids, params)
                    continue
                try:
                    self.engine.add_request(request_id, prompt_token_ids, params)
                except Exception as exc:
                    self._outbox.rejected(request_id, exc)
            elif command[1] in self._compiling:
                # Its compile's result is dropped when it comes; its consumer gets its final "abort" output now.
                waiting = self._compiling.pop(command[1])
                waiting.future.cancel()
                aborted = [
                    RequestOutput.aborted_unstarted(command[1], len(waiting.prompt_token_ids), waiting.arrival_time, i)
                    for i in range(waiting.params.n)
                ]
                self._outbox.step(aborted, self._stats())
            else:
                self.engine.abort(command[1])
        return True

    def _stats(self) -> EngineStats:
        """The engine's stats, with the requests whose grammars compile counted as waiting (each of its ``n``
        sequences): the router must see them as this replica's load."""
        stats = self.engine.stats()
        compiling = sum(c.params.n for c in self._compiling.values())
        return replace(stats, num_waiting=stats.num_waiting + compiling) if compiling else stats

    def _compile(self, request_id: str, prompt_token_ids: list[int], params) -> None:
        self._compiling[request_id] = _Compiling(prompt_token_ids, params, time.time())
        self._start_compiles()
        self._outbox.step([], self._stats())  # its load is seen now, not at the next step

    def _start_compiles(self) -> None:
        """Starts the waiting compiles, in arrival order, while fewer than ``GRAMMAR_COMPILE_THREADS`` run. Daemon
        threads: a compile that never ends (its request failed at the deadline) must not keep the process alive."""
        running = sum(1 for c in self._compiling.values() if c.started_s is not None and not c.future.done())
        for waiting in self._compiling.values():
            if running >= GRAMMAR_COMPILE_THREADS:
                return
            if waiting.started_s is None:
                waiting.started_s = time.monotonic()
                args = (self.engine.compile_grammars, waiting.params, waiting.future)
                threading.Thread(target=_resolve, args=args, name="grammar-compiler", daemon=True).start()
                running += 1

    def _admit_compiled(self) -> None:
        """Requests whose grammars are ready join the engine (in arrival order); a schema that failed to compile, or
        took longer than ``GRAMMAR_COMPILE_TIMEOUT_S``, is the request's refusal."""
        now_s = time.monotonic()
        for request_id in [
            r
            for r, c in self._compiling.items()
            if c.started_s is not None and not c.future.done() and now_s - c.started_s > GRAMMAR_COMPILE_TIMEOUT_S
        ]:
            self._compiling.pop(request_id).future.cancel()  # the thread runs on; its result is dropped
            error = InvalidRequestError(
                f"json_schema did not compile within {GRAMMAR_COMPILE_TIMEOUT_S:g} s: simplify the schema",
                "json_schema",
            )
            self._outbox.rejected(request_id, error)
        for request_id in [r for r, c in self._compiling.items() if c.future.done()]:
            waiting = self._compiling.pop(request_id)
            try:
                grammars = waiting.future.result()
                self.engine.add_request(
                    request_id, waiting.prompt_token_ids, waiting.params, waiting.arrival_time, grammars=grammars
                )
            except Exception as exc:
                self._outbox.rejected(request_id, exc)
        self._start_compiles()

    def _shutdown(self) -> None:
        # A compile under way (a daemon thread) touches only the tokenizer and xgrammar: it is left to run out.
        try:
            self.engine.shutdown()
        except Exception:
            logger.exception("engine shutdown failed")


def _resolve(compile_grammars: Callable, params, future: concurrent.futures.Future) -> None:
    """Runs a compile in its thread and settles ``future`` with what it gave, unless the request gave up on it."""
    try:
        result = compile_grammars(params)
    except BaseException as exc:  # noqa: BLE001 - the request's refusal (or a bug), raised where it is read
        outcome = (future.set_exception, exc)
    else:
        outcome = (future.set_result, result)
    try:
        outcome[0](outcome[1])
    except concurrent.futures.InvalidStateError:  # cancelled: aborted, or past its deadline
        pass


def queue_commands(commands: queue.SimpleQueue) -> Callable[[bool], list[tuple]]:
    """``EngineCore``'s ``next_commands`` over a queue filled by other threads."""

    def next_commands(block: bool) -> list[tuple]:
        batch = []
        try:
            batch.append(commands.get(block=block))
            while True:
                batch.append(commands.get_nowait())
        except queue.Empty:
            pass
        return batch

    return next_commands


# ---- the core's own process ----------------------------------------------------------------------------


class _SocketOutbox:
    """The outbox of a core process: one msgpack message per event on a ZeroMQ PUSH socket."""

    def __init__(self, socket) -> None:
        self._socket = socket

    def step(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        self._socket.send(encode_step(outputs, stats), copy=False)

    def rejected(self, request_id: str, error: BaseException) -> None:
        self._socket.send(encode_rejected(request_id, error))

    def dead(self, message: str) -> None:
        self._socket.send(encode_dead(message))


def _socket_commands(socket, parent_pid: int) -> Callable[[bool], list[tuple]]:
    import zmq

    poller = zmq.Poller()
    poller.register(socket, zmq.POLLIN)
    last_check = [time.monotonic()]

    def next_commands(block: bool) -> list[tuple]:
        now = time.monotonic()
        if now - last_check[0] > PARENT_CHECK_PERIOD_S:
            last_check[0] = now
            if os.getppid() != parent_pid:  # the frontend died without a word: nobody reads the outputs
                return [(STOP,)]
        if block and not poller.poll(PARENT_CHECK_PERIOD_S * 1000):
            return []
        batch = []
        while True:
            try:
                batch.append(decode_command(socket.recv(zmq.NOBLOCK)))
            except zmq.Again:
                return batch

    return next_commands


def main(argv: list[str] | None = None) -> None:
    """Entry point of a core process: build the engine, say ``ready``, run the loop until told to stop."""
    import zmq

    from engine.config import EngineConfig
    from engine.core_protocol import CoreInfo, encode_ready

    parser = argparse.ArgumentParser(description="engine core process (started by engine.core_client.ProcessCore)")
    parser.add_argument("--commands", required=True, help="ZeroMQ address the frontend pushes commands to")
    parser.add_argument("--events", required=True, help="ZeroMQ address the frontend pulls events from")
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine-core %(levelname)s %(message)s")
    config = EngineConfig.from_dict(json.loads(sys.stdin.read()))

    context = zmq.Context()
    events = context.socket(zmq.PUSH)
    events.setsockopt(zmq.LINGER, 5000)
    events.connect(args.events)
    commands = context.socket(zmq.PULL)
    commands.setsockopt(zmq.RCVHWM, 0)  # no limit: the frontend never drops a command (see ProcessCore)
    commands.connect(args.commands)
    outbox = _SocketOutbox(events)
    try:
        engine = LLMEngine(config)
    except Exception as exc:
        logger.exception("the engine failed to start")
        outbox.dead(f"the engine failed to start: {exc!r}")
        events.close()
        context.term()
        raise SystemExit(1) from None
    events.send(encode_ready(CoreInfo(engine.max_model_len, engine.max_request_tokens, engine.stats())))
    EngineCore(engine, _socket_commands(commands, args.parent_pid), outbox).run()
    events.close()
    commands.close(linger=0)
    context.term()


if __name__ == "__main__":
    main()
