"""TPExecutor: a tensor-parallel replica driven from rank 0 (this process), ranks 1.. in other processes.

One step: take the cache changes (slots and mappings) the scheduler made on rank 0's cache since the last step, send
``(ops, seqs)`` to every worker (non-blocking), run rank 0's own forward (the all-reduces inside the model
synchronize the ranks), return rank 0's logits for sampling. The workers' replies (their cache stats after
the replay) are collected at the start of the next step and checked against rank 0's at the same point:
every rank has the same page accounting, verified each step.

How the worker processes are started is not the engine's business: a ``WorkerGroup`` (Ray actors in
``deployments.tp_workers``) is passed in.
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from engine.config import EngineConfig
from engine.distributed import abort_tp_group, destroy_tp_group, init_tp_group
from engine.executor import Executor, WorkerDeadError
from kvcache import CacheOp

logger = logging.getLogger(__name__)

# Fields that must agree between a worker's cache and rank 0's after the same operations.
_CHECKED_STATS = ("total_pages", "free_pages", "mapped_pages", "reclaimable_pages", "num_active_slots")


class WorkerGroup(ABC):
    """Ranks ``1 .. tp_size - 1``, each an ``engine.tp_worker.TPWorker`` in its own process.

    Attributes:
        init_method: ``tcp://host:port`` rendezvous on rank 0's node that the workers were started with.
    """

    init_method: str

    @abstractmethod
    def wait_ready(self) -> None:
        """Block until every worker built its model and cache. Raises ``WorkerDeadError`` on failure."""

    @abstractmethod
    def submit_step(self, ops: list[CacheOp], seqs) -> Any:
        """Send one step to every worker without waiting; returns a handle for :meth:`collect_step`."""

    @abstractmethod
    def collect_step(self, handle: Any, timeout_s: float | None) -> list | None:
        """The workers' ``TPWorker.step`` results in rank order; ``None`` if not all arrived within
        ``timeout_s`` (``None`` = wait). Raises ``WorkerDeadError`` if a worker died or failed."""

    @abstractmethod
    def call(self, method: str, *args) -> list:
        """Call ``TPWorker.<method>(*args)`` on every worker and wait; results in rank order."""

    @abstractmethod
    def check_health(self) -> None:
        """Raise ``WorkerDeadError`` if a worker is known to be dead (never blocks)."""

    @abstractmethod
    def close(self) -> None:
        """Stop every worker. Idempotent."""


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
        step_timeout_s: how long to wait for the workers' replies of a step that rank 0 finished.
    """

    def __init__(self, config: EngineConfig, start_workers: WorkerGroupFactory, step_timeout_s: float = 120.0) -> None:
        from engine.model_runner import ModelRunner
        from engine.weights import resolve_model

        self.tp_size = config.model.tensor_parallel_size
        if self.tp_size < 2:
            raise ValueError(f"tensor_parallel_size must be >= 2 for a TPExecutor, got {self.tp_size}")
        check_tp_shapes(resolve_model(config.model.model).hf_config, self.tp_size)
        self.step_timeout_s = step_timeout_s
        self._closed = False
        self._pending: Any = None
        self._pending_snapshot = None
        self._dead_error: WorkerDeadError | None = None
        device = torch.device(config.model.resolved_device())
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
            config = dataclasses.replace(config, model=dataclasses.replace(config.model, device=str(device)))
        self._is_nccl = device.type == "cuda"
        self.workers = start_workers(config, self._on_worker_death)
        try:
            init_tp_group(self.workers.init_method, 0, self.tp_size, device)
            self.runner = ModelRunner(config.model, config.cache, tp_rank=0)
            self.workers.wait_ready()
        except BaseException:
            self.workers.close()
            destroy_tp_group()
            raise
        self.kv_cache = self.runner.kv_cache
        # Rank 0's decisions depend on its own fences: the other ranks replay its changes, not its calls.
        self.kv_cache.record_ops()
        self._worker_deltas = [0] * (self.tp_size - 1)  # worker free pages - rank 0's at the same point
        self._check_stats(self.kv_cache.stats(), [s["stats"] for s in self.workers.call("cache_state")])

    # ---- Executor ------------------------------------------------------------------------------------------

    def run(self, seqs, prev_token_ids=None, prev_rows=None) -> torch.Tensor:
        # The other ranks get their input ids from the host: no input may still be on rank 0's device.
        if prev_rows is not None and any(r >= 0 for r in prev_rows):
            raise ValueError("a tensor-parallel step needs every input id on the host (no asynchronous scheduling)")
        self.check_health()
        self._collect(timeout_s=self.step_timeout_s)
        ops = self.kv_cache.take_ops()
        snapshot = self.runner.kv_cache.stats()  # what every worker's cache must look like after the replay
        self._pending = self.workers.submit_step(ops, seqs)
        self._pending_snapshot = snapshot
        try:
            return self.runner.run(seqs)
        except Exception as exc:
            # A collective failed: a peer is gone or broke. Report the worker's own error if there is one.
            cause = self._worker_failure()
            self._dead_error = WorkerDeadError(
                f"tensor-parallel step failed on rank 0: {exc!r}" + (f"; {cause}" if cause else "")
            )
            raise self._dead_error from exc

    def cache_stats(self) -> list:
        """Rank 0's live stats, then each worker's as they will be once it replays the pending operations
        (its last reported free pages shifted by rank 0's change since): exact while ranks agree, which
        every step checks."""
        if self._pending is not None and self._dead_error is None:
            try:
                self._collect(timeout_s=0.0)
            except WorkerDeadError:
                pass  # reported by the next run() / check_health()
        live = self.runner.kv_cache.stats()
        per_rank = [live]
        for delta in self._worker_deltas:
            free = max(0, min(live.total_pages, live.free_pages + delta))
            per_rank.append(dataclasses.replace(live, free_pages=free))
        return per_rank

    def check_health(self) -> None:
        if self._dead_error is not None:
            raise self._dead_error
        try:
            self.workers.check_health()
        except WorkerDeadError as exc:
            self._dead_error = exc
            raise

    def rank_cache_states(self) -> list[dict]:
        """Every rank's cache stats and active slots' page ids, rank 0 first (waits for the pending step)."""
        self._collect(timeout_s=self.step_timeout_s)
        cache = self.runner.kv_cache
        rank0 = {
            "rank": 0,
            "stats": cache.stats(),
            "num_kv_heads": cache.config.num_kv_heads,
            "slot_page_ids": {
                s: cache.slot_page_ids(s) for s in range(1, cache.config.max_batch_size + 1) if cache.is_active(s)
            },
        }
        # Workers have not applied the operations recorded since the last step: ship them (no forward).
        ops = self.kv_cache.take_ops()
        if ops:
            self._pending, self._pending_snapshot = self.workers.submit_step(ops, []), cache.stats()
            self._collect(timeout_s=self.step_timeout_s)
        return [rank0] + self.workers.call("cache_state")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.workers.close()
        if self._dead_error is not None and self._is_nccl:
            # A collective waiting for a dead peer never finishes: abort it before the cache waits for the device
            # (and destroying an NCCL group whose peer is gone may wait for it too).
            abort_tp_group()
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.close()
        destroy_tp_group()

    # ---- internals ------------------------------------------------------------------------------------------

    def _on_worker_death(self) -> None:
        if self._closed:
            return
        if self._dead_error is None:
            self._dead_error = WorkerDeadError("a tensor-parallel worker died")
        if self._is_nccl:
            # Rank 0 may be blocked in an NCCL all-reduce waiting for the dead rank: make it raise now.
            abort_tp_group()

    def _collect(self, timeout_s: float | None) -> None:
        """Take the workers' replies of the pending step (if any) and check their cache accounting."""
        if self._pending is None:
            return
        try:
            results = self.workers.collect_step(self._pending, timeout_s)
        except WorkerDeadError as exc:
            self._dead_error = exc
            raise
        if results is None:
            if timeout_s:
                self._dead_error = WorkerDeadError(f"tensor-parallel workers did not answer within {timeout_s} s")
                raise self._dead_error
            return
        snapshot, self._pending, self._pending_snapshot = self._pending_snapshot, None, None
        self._check_stats(snapshot, results)
        self._worker_deltas = [s.free_pages - snapshot.free_pages for s in results]

    def _check_stats(self, rank0, workers: list) -> None:
        for rank, stats in enumerate(workers, start=1):
            diff = {
                f: (getattr(rank0, f), getattr(stats, f))
                for f in _CHECKED_STATS
                if getattr(rank0, f) != getattr(stats, f)
            }
            if diff:
                self._dead_error = WorkerDeadError(
                    f"rank {rank}'s KV cache diverged from rank 0's (field: (rank 0, rank {rank})): {diff}"
                )
                raise self._dead_error

    def _worker_failure(self) -> str | None:
        """The workers' error for the pending step, if they failed (waits a little for it)."""
        if self._pending is None:
            return None
        try:
            self.workers.collect_step(self._pending, 5.0)
        except WorkerDeadError as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - diagnosis only
            return repr(exc)
        return None
