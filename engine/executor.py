"""The executor seam: where a step's forward runs (one device, or several tensor-parallel ranks).

``LLMEngine`` talks to one ``Executor``: the scheduler allocates and grows slots on ``executor.kv_cache``
(rank 0's cache), the engine calls ``executor.run(seqs)`` once per step and samples from the logits. A
tensor-parallel executor (``engine.tp_executor.TPExecutor``) makes the other ranks follow.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from engine.config import EngineConfig
from engine.errors import EngineError

if TYPE_CHECKING:
    from engine.model_runner import ModelRunner
    from kvcache import KVCache


class WorkerDeadError(EngineError):
    """A tensor-parallel rank died or failed: the engine cannot step any more."""


class Executor(ABC):
    """Runs forwards of scheduled sequences.

    Attributes:
        runner: rank 0's ``ModelRunner`` (model config, tokenizer source, EOS ids, ``max_model_len``).
        kv_cache: the cache the scheduler manages (rank 0's; every rank mirrors its slots and pages).
        tp_size: number of tensor-parallel ranks.
        supports_device_inputs: ``run`` accepts input ids still on the device (``prev_rows``), which
            asynchronous scheduling needs.
        on_failure: set by whoever streams the engine's outputs; called once, from any thread, with the error when
            a rank is found dead outside ``run`` (Ray's death notice). The step in flight may never return: rank 0
            waits on its device for collectives the dead rank never joins, so its consumers must hear it now.
    """

    runner: ModelRunner
    kv_cache: KVCache
    tp_size: int = 1
    supports_device_inputs: bool = False
    on_failure: Callable[[BaseException], None] | None = None

    @abstractmethod
    def run(self, seqs, prev_token_ids: torch.Tensor | None = None, prev_rows: list[int] | None = None) -> torch.Tensor:
        """Forward of ``seqs`` (``(slot, token_ids, start_pos)`` per sequence) on every rank; placeholder input
        ids come from ``prev_token_ids`` (see ``ModelRunner.run``) where ``supports_device_inputs``.
        Returns rank 0's logits of each sequence's last token, ``[N, vocab]`` float32 (asynchronous on GPU).

        Raises:
            WorkerDeadError: a rank died or failed; the engine must stop.
        """

    @abstractmethod
    def cache_stats(self) -> list:
        """``KVCacheStats`` of every rank's cache, rank 0 first (the other ranks' as of their last step)."""

    @abstractmethod
    def check_health(self) -> None:
        """Raise ``WorkerDeadError`` if a rank is known to be dead (cheap; never blocks on a rank)."""

    @abstractmethod
    def close(self) -> None:
        """Release every rank's cache and processes. Idempotent."""


ExecutorFactory = Callable[[EngineConfig], Executor]


class LocalExecutor(Executor):
    """One device, one ``ModelRunner`` in this process (``tensor_parallel_size == 1``).

    ``runner_kwargs`` go to the ``ModelRunner`` (``kv_cache_factory``, ``attention_backend``): another
    ``kvcache.KVCache`` implementation and the attention backend that reads it.
    """

    def __init__(self, config: EngineConfig, **runner_kwargs) -> None:
        from engine.model_runner import ModelRunner

        if config.model.tensor_parallel_size != 1:
            raise ValueError(
                f"tensor_parallel_size must be 1 for a LocalExecutor, got {config.model.tensor_parallel_size}: "
                "pass an executor factory for tensor parallelism (deployments.tp_workers.ray_tp_executor_factory)"
            )
        self.runner = ModelRunner(config.model, config.cache, **runner_kwargs)
        self.kv_cache = self.runner.kv_cache
        self.tp_size = 1
        self.supports_device_inputs = True

    def run(self, seqs, prev_token_ids=None, prev_rows=None) -> torch.Tensor:
        return self.runner.run(seqs, prev_token_ids, prev_rows)

    def cache_stats(self) -> list:
        return [self.kv_cache.stats()]

    def check_health(self) -> None:
        """One process: if it runs, it is alive."""

    def close(self) -> None:
        self.runner.close()
