"""The frontend's handle on the engine core, in a thread of this process or in a process of its own.

Both run ``engine.engine_core.EngineCore`` and hand its events to the same :class:`~engine.core_protocol.CoreOutbox`
(the ``AsyncLLMEngine``): ``InProcessCore`` calls it from the core's thread, ``ProcessCore`` from a thread that
reads the core process's ZeroMQ socket. The process keeps the step loop off this process's GIL, so that the
frontend's per-token work (event loop, detokenized streams, Ray's RPCs) never delays a step.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from typing import Protocol

from engine.config import EngineConfig
from engine.core_protocol import ABORT, ADD, DEAD, READY, REJECTED, STEP, STOP, CoreInfo, CoreOutbox
from engine.errors import EngineDeadError
from engine.executor import ExecutorFactory
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineCoreClient(Protocol):
    """What the frontend calls; the core's events go to the outbox given at construction."""

    info: CoreInfo
    pid: int  # the process the core steps in

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None: ...

    def abort(self, request_id: str) -> None: ...

    def check_health(self) -> None:
        """Raise why the core cannot serve (e.g. a tensor-parallel worker died while idle); None if it can."""

    def abandon(self) -> None:
        """The core is stuck (no step finishes): end it now where that is possible, so that what it holds (the
        device's memory) is free for the replica that replaces this one."""

    def shutdown(self, timeout_s: float) -> None: ...


class InProcessCore:
    """The core loop in a thread of this process (``engine_process: false``, and always under tensor parallelism:
    the loop drives the TP worker actors from the replica's process)."""

    def __init__(self, outbox: CoreOutbox, config: EngineConfig | None = None, engine=None, executor_factory=None):
        from engine.engine_core import EngineCore, queue_commands
        from engine.llm_engine import LLMEngine

        self.engine = engine if engine is not None else LLMEngine(config, executor_factory=executor_factory)
        self.info = CoreInfo(self.engine.max_model_len, self.engine.max_request_tokens, self.engine.stats())
        self.pid = os.getpid()
        # A rank's death ends every stream at once, even while the step in flight waits for that rank on the device.
        self.engine.executor.on_failure = lambda exc: outbox.dead(f"tensor-parallel engine failed: {exc!r}")
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        core = EngineCore(self.engine, queue_commands(self._commands), outbox)
        self._thread = threading.Thread(target=core.run, name="llm-engine-loop", daemon=True)
        self._thread.start()

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._commands.put((ADD, request_id, prompt_token_ids, params))

    def abort(self, request_id: str) -> None:
        self._commands.put((ABORT, request_id))

    def check_health(self) -> None:
        self.engine.executor.check_health()

    def abandon(self) -> None:
        """A thread cannot be stopped: the core's memory goes with the replica's process, when Serve ends it."""

    def shutdown(self, timeout_s: float) -> None:
        if self._thread.is_alive():
            self._commands.put((STOP,))
            self._thread.join(timeout_s)


class ProcessCore:
    """The core loop in a child process (``python -m engine.engine_core``), over two ZeroMQ ``ipc://`` sockets in a
    private temporary directory: commands PUSHed to it as they come, one msgpack message back per step.

    The child is started with this interpreter and environment, reads the config from its stdin, and exits when
    told to stop or when this process is gone. If it dies, every request in it and every later one fails with
    ``EngineDeadError`` (the outbox hears ``dead``).

    Args:
        outbox: receives the core's events, from this object's reader thread.
        config: the engine's config (``tensor_parallel_size`` 1).
        start_timeout_s: how long the child may take to load the model and say ready.
    """

    def __init__(self, outbox: CoreOutbox, config: EngineConfig, start_timeout_s: float = 1800.0) -> None:
        import zmq

        from engine.core_protocol import decode_event

        self._decode = decode_event
        self._outbox = outbox
        self._dir = tempfile.mkdtemp(prefix="vattn-core-")
        self._context = zmq.Context()
        self._commands = self._context.socket(zmq.PUSH)
        self._commands.setsockopt(zmq.LINGER, 0)
        # No queue limit at either end: a send that does not block is then refused only without a core to take it
        # (gone), never because a core busy in a long step has not read the last thousands (a dropped ADD would be
        # a request that never answers, a dropped ABORT one that runs on).
        self._commands.setsockopt(zmq.SNDHWM, 0)
        self._commands.bind(f"ipc://{self._dir}/commands")
        self._events = self._context.socket(zmq.PULL)
        self._events.bind(f"ipc://{self._dir}/events")
        self._send_lock = threading.Lock()
        self._stopping = False
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "engine.engine_core",
                "--commands",
                f"ipc://{self._dir}/commands",
                "--events",
                f"ipc://{self._dir}/events",
                "--parent-pid",
                str(os.getpid()),
            ],
            stdin=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        self.pid = self.process.pid
        self.process.stdin.write(json.dumps(asdict(config)).encode())
        self.process.stdin.close()
        try:
            self.info = self._wait_ready(start_timeout_s)
        except BaseException:
            self.process.kill()
            self.process.wait()
            self._close()
            raise
        self._reader = threading.Thread(target=self._read_events, name="engine-core-events", daemon=True)
        self._reader.start()

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._send((ADD, request_id, list(prompt_token_ids), params))

    def abort(self, request_id: str) -> None:
        self._send((ABORT, request_id))

    def check_health(self) -> None:
        code = self.process.poll()
        if code is not None and not self._stopping:
            raise EngineDeadError(f"the engine core process exited with code {code}")

    def abandon(self) -> None:
        """Kills the core process: a hung kernel's process gives its device memory back only when it ends, and a
        stuck core never reads the STOP of :meth:`shutdown`."""
        if self.process.poll() is None:
            logger.error("killing the stuck engine core process %d", self.pid)
            self.process.kill()  # reaped by the reader thread or the shutdown: a process in a hung kernel may take
            # a while to end, and the caller is a health check

    def shutdown(self, timeout_s: float) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self.process.poll() is None:
            self._send((STOP,))
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                logger.error("the engine core process did not stop in %.0f s; killing it", timeout_s)
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout_s)
        self._close()

    # ---- internals -----------------------------------------------------------------------------------

    def _send(self, command: tuple) -> None:
        import zmq

        from engine.core_protocol import encode_command

        data = encode_command(command)
        with self._send_lock:  # ZeroMQ sockets are not thread-safe; callers may be on several threads
            try:
                self._commands.send(data, zmq.NOBLOCK)
            except (zmq.Again, zmq.ZMQError):  # the core is gone: its death reaches the outbox from the reader
                pass

    def _wait_ready(self, timeout_s: float) -> CoreInfo:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._events.poll(200):
                event = self._decode(self._events.recv())
                if event[0] == READY:
                    return event[1]
                if event[0] == DEAD:
                    raise EngineDeadError(event[1])
            elif self.process.poll() is not None:
                raise EngineDeadError(f"the engine core process exited with code {self.process.returncode}")
        raise EngineDeadError(f"the engine core process did not start in {timeout_s:.0f} s")

    def _read_events(self) -> None:
        """Hands every event to the outbox until the core says ``dead`` or its process is gone."""
        try:
            while True:
                if not self._events.poll(500):
                    if self.process.poll() is not None:
                        self._outbox.dead(f"the engine core process exited with code {self.process.returncode}")
                        return
                    continue
                event = self._decode(self._events.recv())
                kind = event[0]
                if kind == STEP:
                    self._outbox.step(event[1], event[2])
                elif kind == REJECTED:
                    self._outbox.rejected(event[1], event[2])
                elif kind == DEAD:
                    self._outbox.dead(event[1])
                    return
        except Exception as exc:  # noqa: BLE001 - a broken pipe is a dead core to every consumer
            logger.exception("reading the engine core's events failed")
            self._outbox.dead(f"reading the engine core's events failed: {exc!r}")

    def _close(self) -> None:
        self._commands.close(linger=0)
        self._events.close(linger=0)
        self._context.term()
        shutil.rmtree(self._dir, ignore_errors=True)


def start_core(
    outbox: CoreOutbox, config: EngineConfig, executor_factory: ExecutorFactory | None = None
) -> EngineCoreClient:
    """The core ``config.engine_process`` asks for: its own process, or a thread of this one (always under tensor
    parallelism, whose worker actors the loop drives from this process)."""
    if config.resolved_engine_process():
        return ProcessCore(outbox, config)
    return InProcessCore(outbox, config, executor_factory=executor_factory)
