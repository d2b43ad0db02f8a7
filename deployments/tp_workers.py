"""Tensor-parallel ranks as Ray actors: the Ray side of ``engine.tp_executor.TPExecutor``.

A replica with ``tensor_parallel_size = tp`` runs in a placement group of ``tp`` bundles (STRICT_PACK: one
node). The replica actor itself is rank 0 and holds bundle 0; rank ``r`` is a :class:`TPWorkerActor` pinned
to bundle ``r``. The ranks meet at a ``tcp://`` rendezvous on rank 0's node (a free port picked there) and
form a NCCL (GPU) or gloo (CPU) group; then each worker's step loop follows rank 0's messages (``engine.tp_channel``),
with no Ray call per step. The actors are owned by the replica: if the replica dies, so do they;
if one of them dies, the replica's engine fails (``WorkerDeadError`` -> ``EngineDeadError``) and its health
check raises, so Serve replaces the whole replica.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from engine.config import EngineConfig
from engine.distributed import DEFAULT_TP_TIMEOUT_S, TP_ENV_VARS, free_port
from engine.executor import Executor, ExecutorFactory, LocalExecutor, WorkerDeadError
from engine.tp_executor import TPExecutor, WorkerGroup

logger = logging.getLogger("ray.serve")

# A worker whose step failed exits after this delay: peers blocked in a collective waiting for it then fail
# at once (closed sockets / the driver's death watch) instead of at the collective timeout; the delay lets
# the error reply reach rank 0 first.
_EXIT_AFTER_FAILURE_S = 1.0


@ray.remote(concurrency_groups={"steps": 1})
class TPWorkerActor:
    """Hosts one ``engine.tp_worker.TPWorker``. Its step loop runs in a thread of its own (``serve_steps``, fed by
    rank 0 over ``engine.tp_channel``); the other methods serve set-up and tests."""

    def __init__(self, config: EngineConfig, rank: int, init_method: str, device: str | None, timeout_s: float) -> None:
        from engine.tp_worker import TPWorker

        for name, value in TP_ENV_VARS.items():
            os.environ.setdefault(name, value)
        self._worker = TPWorker(config, rank, init_method, device=device, timeout_s=timeout_s)

    def ready(self) -> int:
        return self._worker.rank

    @ray.method(concurrency_group="steps")
    def serve_steps(self, step_address: str, reply_address: str) -> None:
        """Follows rank 0's steps; on a ``STOP`` releases the cache, leaves the group and returns. On a failure the
        error is this call's result (rank 0's notice of it), and the process exits soon after."""
        from engine.tp_channel import StepReceiver

        channel = StepReceiver(step_address, reply_address)
        try:
            self._worker.serve(channel)
        except BaseException:
            logger.exception("tensor-parallel rank %d failed a step; exiting", self._worker.rank)
            threading.Thread(target=_exit_soon, daemon=True).start()
            raise
        finally:
            try:
                channel.close()
            except Exception:  # noqa: BLE001 - leaving the group below matters more
                logger.exception("closing the step channel failed")
        self._worker.close()

    def cache_state(self) -> dict:
        return self._worker.cache_state()

    def pid(self) -> int:
        return os.getpid()


def _exit_soon() -> None:
    time.sleep(_EXIT_AFTER_FAILURE_S)
    os._exit(1)


class RayWorkerGroup(WorkerGroup):
    """Ranks ``1 .. tp-1`` as :class:`TPWorkerActor` actors.

    Inside a placement group (a Serve replica with ``placement_group_bundles``) rank ``r`` takes bundle ``r``
    and exactly its resources; outside one (tests, offline benchmarks) each worker asks for one GPU on GPU
    and nothing on CPU, on rank 0's node.

    Args:
        config: the engine config (rank 0's device already resolved).
        on_death: called once, from a watcher thread, when a worker dies unexpectedly.
        name_prefix: names the actors ``<prefix>-rank<r>`` (findable with ``ray.get_actor``); ``None``: unnamed.
        ready_timeout_s: how long model loading on the workers may take.
        timeout_s: collective timeout of the group.
    """

    def __init__(
        self,
        config: EngineConfig,
        on_death: Callable[[], None],
        name_prefix: str | None = None,
        ready_timeout_s: float = 900.0,
        timeout_s: float = DEFAULT_TP_TIMEOUT_S,
    ) -> None:
        tp_size = config.model.tensor_parallel_size
        is_cuda = config.model.resolved_device().startswith("cuda")
        host = ray.util.get_node_ip_address()
        self.init_method = f"tcp://{host}:{free_port(host)}"
        self.ready_timeout_s = ready_timeout_s
        self._on_death = on_death
        self._closing = False
        self._dead_error: WorkerDeadError | None = None
        pg = ray.util.get_current_placement_group()
        if pg is not None and len(pg.bundle_specs) < tp_size:
            raise ValueError(
                f"the replica's placement group has {len(pg.bundle_specs)} bundles; "
                f"tensor_parallel_size {tp_size} needs one per rank"
            )
        self.actors = []
        for rank in range(1, tp_size):
            options: dict[str, Any] = {"max_restarts": 0, "max_task_retries": 0}
            if pg is not None:
                bundle = pg.bundle_specs[rank]
                options.update(
                    num_cpus=bundle.get("CPU", 0),
                    num_gpus=bundle.get("GPU", 0),
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        pg, placement_group_bundle_index=rank, placement_group_capture_child_tasks=False
                    ),
                )
            else:
                options.update(
                    num_cpus=0,
                    num_gpus=1 if is_cuda else 0,
                    # Rank 0's node, as a placement group's STRICT_PACK would: the step channel is on loopback.
                    scheduling_strategy=NodeAffinitySchedulingStrategy(
                        ray.get_runtime_context().get_node_id(), soft=False
                    ),
                )
            if is_cuda:
                # Ray gives each actor its own CUDA_VISIBLE_DEVICES: the worker's GPU is cuda:0 there.
                options["runtime_env"] = {"env_vars": dict(TP_ENV_VARS)}
            if name_prefix is not None:
                options["name"] = f"{name_prefix}-rank{rank}"
            self.actors.append(
                TPWorkerActor.options(**options).remote(
                    config, rank, self.init_method, "cuda:0" if is_cuda else "cpu", timeout_s
                )
            )
        self._loop_refs: list = []
        self._failed = threading.Event()
        self._stopping = False

    def wait_ready(self) -> None:
        try:
            ray.get([a.ready.remote() for a in self.actors], timeout=self.ready_timeout_s)
        except Exception as exc:
            raise WorkerDeadError(f"a tensor-parallel worker failed to start: {_describe(exc)}") from exc

    def call(self, method: str, *args) -> list:
        try:
            return ray.get([getattr(a, method).remote(*args) for a in self.actors], timeout=self.ready_timeout_s)
        except Exception as exc:
            raise WorkerDeadError(f"a tensor-parallel worker failed {method}: {_describe(exc)}") from exc

    def start(self, step_addresses: list[str], reply_address: str) -> None:
        self._loop_refs = [a.serve_steps.remote(addr, reply_address) for a, addr in zip(self.actors, step_addresses)]
        self._watcher = threading.Thread(target=self._watch, name="tp-worker-watch", daemon=True)
        self._watcher.start()

    def expect_stop(self) -> None:
        self._stopping = True

    def failure(self, timeout_s: float) -> str | None:
        self._failed.wait(timeout_s)
        return str(self._dead_error) if self._dead_error is not None else None

    def check_health(self) -> None:
        if self._dead_error is not None:
            raise self._dead_error

    def close(self, wait_s: float = 0.0) -> bool:
        self._closing = True
        stopped = False
        if wait_s > 0 and self._loop_refs:
            done, _ = ray.wait(self._loop_refs, num_returns=len(self._loop_refs), timeout=wait_s)
            try:
                ray.get(done)
                stopped = len(done) == len(self._loop_refs)
            except Exception as exc:  # noqa: BLE001 - a loop failed on the way out
                logger.warning("a tensor-parallel worker failed while stopping: %s", _describe(exc))
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        return stopped

    def _watch(self) -> None:
        """Until every worker's step loop ended: a loop that raises (a failed step, or the actor's death), or that
        returns unasked, is the group's death notice."""
        pending = list(self._loop_refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            if self._closing:
                return
            try:
                ray.get(ready)
                if self._stopping:
                    continue  # stopped as asked
                error = WorkerDeadError("a tensor-parallel worker left its step loop")
            except Exception as exc:  # noqa: BLE001 - the death notice
                error = WorkerDeadError(f"a tensor-parallel worker died: {_describe(exc)}")
            break
        else:
            return
        if self._closing:
            return
        logger.error("%s", error)
        self._dead_error = error
        self._failed.set()
        self._on_death()


def _describe(exc: BaseException) -> str:
    """One line about ``exc``; a task's error is described by the exception it raised on the worker."""
    cause = getattr(exc, "cause", None)
    if isinstance(exc, RayTaskError) and isinstance(cause, BaseException):
        exc = cause
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


def make_executor_factory(
    name_prefix: str | None = None, ready_timeout_s: float = 900.0, timeout_s: float = DEFAULT_TP_TIMEOUT_S
) -> ExecutorFactory:
    """``LLMEngine``'s ``executor_factory``: a ``LocalExecutor`` for ``tensor_parallel_size`` 1, else a
    ``TPExecutor`` whose ranks 1.. are Ray actors (see :class:`RayWorkerGroup`). Needs ``ray.init`` done
    (always true inside a Serve replica)."""

    def factory(config: EngineConfig) -> Executor:
        if config.model.tensor_parallel_size == 1:
            return LocalExecutor(config)

        def start_workers(cfg: EngineConfig, on_death: Callable[[], None]) -> RayWorkerGroup:
            return RayWorkerGroup(
                cfg, on_death, name_prefix=name_prefix, ready_timeout_s=ready_timeout_s, timeout_s=timeout_s
            )

        return TPExecutor(config, start_workers)

    return factory
