"""TPExecutor: a tensor-parallel replica driven from rank 0 (this process), ranks 1.. in other processes.

One step: take the cache changes (slots and mappings) the scheduler made on rank 0's cache since the last step, push
``(ops, rank 0's page accounting, seqs)`` to every worker over the step channel (``engine.tp_channel``: one ZeroMQ
message, no Ray call, no reply), then run rank 0's own forward; the all-reduces inside the model synchronize the ranks
on the device. Each worker checks its accounting against rank 0's after the replay and fails loudly if they differ,
so every rank holds the same pages. Input ids the previous step sampled on rank 0's device (asynchronous scheduling)
reach the workers by a broadcast over the process group, ahead of the forward: the host waits for nothing.

How the worker processes are started is not the engine's business: a ``WorkerGroup`` (Ray actors in
``deployments.tp_workers``) is passed in.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.distributed import abort_tp_group, destroy_tp_group, init_tp_group
from engine.executor import Executor, WorkerDeadError
from engine.tp_channel import (
    STATE,
    STEP,
    STOP,
    ChannelTimeoutError,
    StepSender,
    cache_state,
    check_stats,
    checked_stats,
)
from kvcache import CacheDesyncError

logger = logging.getLogger(__name__)

# How long a closing executor waits for a worker to take its STOP, and for the workers to finish the steps they were
# sent and leave the group (a healthy worker needs well under a second for either).
_STOP_SEND_S = 5.0
_STOP_WAIT_S = 20.0
# The step channel's address: every rank runs on rank 0's node (see ``WorkerGroup``).
_CHANNEL_HOST = "127.0.0.1"


class WorkerGroup(ABC):
    """Ranks ``1 .. tp_size - 1``, each an ``engine.tp_worker.TPWorker`` in its own process on rank 0's node.

    Attributes:
        init_method: ``tcp://host:port`` rendezvous on rank 0's node that the workers were started with.
    """

    init_method: str

    @abstractmethod
    def wait_ready(self) -> None:
        """Block until every worker built its model and cache. Raises ``WorkerDeadError`` on failure."""

    @abstractmethod
    def call(self, method: str, *args) -> list:
        """Call ``TPWorker.<method>(*args)`` on every worker and wait; results in rank order. Only before
        :meth:`start`: then the step loops own the workers."""

    @abstractmethod
    def start(self, step_addresses: list[str], reply_address: str) -> None:
        """Start each worker's step loop (``TPWorker.serve``) on the channel at ``step_addresses[rank - 1]`` and
        ``reply_address``. A loop that ends other than by :meth:`close` (the worker failed or died) is the group's
        death notice."""

    @abstractmethod
    def expect_stop(self) -> None:
        """The step loops are about to be sent a ``STOP``: from now on a loop that returns is no failure (one that
        raises still is)."""

    @abstractmethod
    def failure(self, timeout_s: float) -> str | None:
        """What a worker failed with, waiting up to ``timeout_s`` for it to be reported; ``None`` if none was."""

    @abstractmethod
    def check_health(self) -> None:
        """Raise ``WorkerDeadError`` if a worker is known to be dead (never blocks)."""

    @abstractmethod
    def close(self, wait_s: float = 0.0) -> bool:
        """Stop every worker: give their step loops up to ``wait_s`` to end (after a ``STOP``: each worker waits for
        its device and leaves the group), then end the processes. Returns whether every loop ended by itself.
        Idempotent."""


# (config, on_worker_death) -> started (not necessarily ready) workers. ``on_worker_death`` is called once,
# from any thread, when a worker dies outside of a close().
WorkerGroupFactory = Callable[[EngineConfig, Callable[[], None]], WorkerGroup]


def check_tp_shapes(hf_config: Any, tp_size: int) -> None:
    """Reject a model whose shapes cannot be split ``tp_size`` ways, naming the field.

    Query heads, the MLP width and the vocabulary split evenly; KV heads split evenly, or (vLLM's
    replication) ``tp_size`` is a multiple of them and each KV head is held by ``tp_size / kv_heads`` ranks.
    """
    problems = []
    heads = hf_config.num_attention_heads
    kv_heads = hf_config.num_key_value_heads
    if heads % tp_size:
        problems.append(f"num_attention_heads ({heads})")
    if kv_heads % tp_size and tp_size % kv_heads:
        problems.append(f"num_key_value_heads ({kv_heads}; or tensor_parallel_size a multiple of it)")
    if hf_config.intermediate_size % tp_size:
        problems.append(f"intermediate_size ({hf_config.intermediate_size})")
    if hf_config.vocab_size % tp_size:
        problems.append(f"vocab_size ({hf_config.vocab_size})")
    if problems:
        raise ValueError(
            f"tensor_parallel_size ({tp_size}) must divide {', '.join(problems)} of model "
            f"{getattr(hf_config, 'name_or_path', '') or hf_config.model_type!r}"
        )


class TPExecutor(Executor):
    """Tensor-parallel executor: rank 0 here, ranks ``1..tp-1`` from ``start_workers``.

    Args:
        config: the engine config; ``config.model.tensor_parallel_size`` ranks.
        start_workers: starts the other ranks (see ``WorkerGroupFactory``).
        channel_timeout_s: how long a step may wait for a worker to take it (a full queue: the worker stalls), and
            :meth:`rank_cache_states` for the workers' answers; either gives up at once when a worker is known
            dead (a dead worker's queue takes nothing).
    """

    def __init__(
        self, config: EngineConfig, start_workers: WorkerGroupFactory, channel_timeout_s: float = 120.0
    ) -> None:
        from engine.model_runner import ModelRunner
        from engine.weights import resolve_model

        self.tp_size = config.model.tensor_parallel_size
        if self.tp_size < 2:
            raise ValueError(f"tensor_parallel_size must be >= 2 for a TPExecutor, got {self.tp_size}")
        check_tp_shapes(resolve_model(config.model.model).hf_config, self.tp_size)
        self._closed = False
        self._left_group = False  # rank 0 destroyed its group: nothing left to abort
        self._group_lock = threading.Lock()
        self._dead_error: WorkerDeadError | None = None
        self._channel: StepSender | None = None
        device = torch.device(config.model.resolved_device())
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
            config = dataclasses.replace(config, model=dataclasses.replace(config.model, device=str(device)))
        self._is_nccl = device.type == "cuda"
        self.supports_device_inputs = True
        self.workers = start_workers(config, self._on_worker_death)
        try:
            init_tp_group(self.workers.init_method, 0, self.tp_size, device)
            self.runner = ModelRunner(config.model, config.cache, tp_rank=0)
            self.workers.wait_ready()
            self.kv_cache = self.runner.kv_cache
            # Rank 0's decisions depend on its own fences: the other ranks replay its changes, not its calls.
            self.kv_cache.record_ops()
            expected = checked_stats(self.kv_cache.stats())
            for rank, state in enumerate(self.workers.call("cache_state"), start=1):
                self._check_rank(rank, expected, state["stats"])
            self._channel = StepSender(_CHANNEL_HOST, self.tp_size - 1, channel_timeout_s)
            self.workers.start(self._channel.step_addresses, self._channel.reply_address)
        except BaseException:
            self.workers.close()
            if self._channel is not None:
                self._channel.close()
            if self._is_nccl:
                self._release_graphs()
                abort_tp_group()  # the workers are gone: destroying the group must not wait for them
            self._left_group = True
            destroy_tp_group()
            raise

    # ---- Executor ------------------------------------------------------------------------------------------

    def run(self, seqs, prev_token_ids=None, prev_rows=None) -> torch.Tensor:
        self.check_health()
        fill = prev_rows is not None and any(r >= 0 for r in prev_rows)
        prev = (prev_rows, prev_token_ids.shape[0], prev_token_ids.dtype) if fill else None
        self._send((STEP, self.kv_cache.take_ops(), checked_stats(self.kv_cache.stats()), seqs, prev))
        try:
            if fill:
                dist.broadcast(prev_token_ids, src=0)  # the workers' copy of the placeholders' ids
                return self.runner.run(seqs, prev_token_ids, prev_rows)
            return self.runner.run(seqs)
        except Exception as exc:
            # A collective failed: a peer is gone or broke. Report the worker's own error if there is one.
            cause = self.workers.failure(5.0)
            self._dead_error = WorkerDeadError(
                f"tensor-parallel step failed on rank 0: {exc!r}" + (f"; {cause}" if cause else "")
            )
            raise self._dead_error from exc
        except BaseException as exc:  # interrupted: the workers wait in collectives rank 0 never joins
            self._dead_error = WorkerDeadError(f"tensor-parallel step interrupted on rank 0: {exc!r}")
            raise

    def cache_stats(self) -> list:
        """Every rank's stats: rank 0's, which every other rank matches after replaying the same operations (each
        step checks it; a rank that diverges fails the engine). The workers catch up at their next step."""
        return [self.runner.kv_cache.stats()] * self.tp_size

    def check_health(self) -> None:
        if self._dead_error is not None:
            raise self._dead_error
        try:
            self.workers.check_health()
        except WorkerDeadError as exc:
            self._dead_error = exc
            raise

    def rank_cache_states(self) -> list[dict]:
        """Every rank's cache stats and active slots' page ids, rank 0 first (the workers replay the operations
        recorded since the last step first)."""
        self.check_health()
        rank0 = cache_state(0, self.kv_cache)
        self._send((STATE, self.kv_cache.take_ops(), checked_stats(rank0["stats"])))
        try:
            states = self._channel.replies(self.tp_size - 1, stop=self._is_dead)
        except ChannelTimeoutError as exc:
            self._dead_error = self._dead_error or WorkerDeadError(f"tensor-parallel workers did not answer: {exc}")
            raise self._dead_error from None
        return [rank0] + sorted(states, key=lambda state: state["rank"])

    def close(self) -> None:
        """Healthy ranks leave together: a ``STOP`` after the last step, then every rank waits for its own device
        (the steps' collectives complete, each rank having been sent them all), leaves the group and releases its
        cache, rank 0 here at the same time as the workers in theirs; then the worker processes end. A dead or
        stalled group is aborted first instead: a collective waiting for a dead peer never finishes. A worker that
        dies while rank 0 waits for its device aborts the group then too (``_on_worker_death``)."""
        if self._closed:
            return
        self._closed = True
        healthy = False
        if self._dead_error is None and self._channel is not None and self.workers.failure(0.0) is None:
            self.workers.expect_stop()
            try:
                self._channel.send((STOP,), timeout_s=_STOP_SEND_S)
                healthy = True
            except ChannelTimeoutError:
                logger.warning("a tensor-parallel worker took no STOP message within %.0f s", _STOP_SEND_S)
        if not healthy:
            self.workers.close()
            if self._is_nccl:
                self._release_graphs()
                abort_tp_group()  # before the cache waits for the device (and before destroying the group)
        try:
            runner = getattr(self, "runner", None)
            if runner is not None:
                runner.close()
        finally:
            with self._group_lock:
                self._left_group = True
            destroy_tp_group()
            if healthy and not self.workers.close(wait_s=_STOP_WAIT_S):
                logger.warning("a tensor-parallel worker did not stop cleanly within %.0f s; ended it", _STOP_WAIT_S)
            if self._channel is not None:
                self._channel.close()

    # ---- internals ------------------------------------------------------------------------------------------

    def _send(self, message: tuple) -> None:
        try:
            self._channel.send(message, stop=self._is_dead)
        except ChannelTimeoutError as exc:
            self._dead_error = self._dead_error or WorkerDeadError(f"tensor-parallel workers stalled: {exc}")
            raise self._dead_error from None

    def _is_dead(self) -> bool:
        """A worker is known dead (the death watch said so, from its thread): a send or a wait for its replies gives
        up at once instead of waiting out the channel's timeout."""
        return self._dead_error is not None

    def _release_graphs(self) -> None:
        """Before an abort: the CUDA graphs hold the communicator, and aborting the group waits for them too. (A
        worker's death aborts from the watcher thread with the graphs alive: that abort completes once the step
        fails and :meth:`close` gets here.)"""
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.release_graphs()

    def _on_worker_death(self) -> None:
        """From the group's watcher thread, at any time until rank 0 left the group (while closing too)."""
        if self._dead_error is None:
            workers = getattr(self, "workers", None)
            cause = workers.failure(0.0) if workers is not None else None
            self._dead_error = WorkerDeadError(cause or "a tensor-parallel worker died")
        if self.on_failure is not None and not self._closed:
            # First: the abort below can wait as long as the step's CUDA graphs hold the communicator.
            self.on_failure(self._dead_error)
        with self._group_lock:
            if self._is_nccl and not self._left_group:
                # Rank 0 may be blocked in an NCCL all-reduce waiting for the dead rank: make it raise now.
                abort_tp_group()

    def _check_rank(self, rank: int, expected: tuple[int, ...], stats) -> None:
        try:
            check_stats(rank, expected, stats)
        except CacheDesyncError as exc:
            self._dead_error = WorkerDeadError(str(exc))
            raise self._dead_error from None
