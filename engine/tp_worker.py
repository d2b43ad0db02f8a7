"""TPWorker: one tensor-parallel rank > 0 of a replica, in its own process (plain Python; the Ray actor that
hosts it lives in ``deployments.tp_workers``).

Each step it replays rank 0's cache operations (so its slots and pages follow the scheduler's decisions),
then runs the same forward as rank 0; the collectives inside the model keep the ranks in lockstep.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from engine.config import EngineConfig
from engine.distributed import DEFAULT_TP_TIMEOUT_S, destroy_tp_group, init_tp_group
from kvcache import CacheOp, KVCacheStats

logger = logging.getLogger(__name__)


class TPWorker:
    """Rank ``rank`` of a ``tensor_parallel_size`` group.

    Args:
        config: the engine config (identical on every rank: same model, seed, cache sizing).
        rank: this worker's rank, ``1 .. tp_size - 1`` (rank 0 is the engine's own process).
        init_method: the group's ``tcp://host:port`` rendezvous.
        device: overrides ``config.model.device`` (``"cuda:0"`` in a process that sees one GPU).
        timeout_s: collective timeout (see ``engine.distributed.init_tp_group``).
    """

    def __init__(
        self,
        config: EngineConfig,
        rank: int,
        init_method: str,
        device: str | None = None,
        timeout_s: float = DEFAULT_TP_TIMEOUT_S,
    ) -> None:
        from engine.model_runner import ModelRunner

        model_config = config.model if device is None else dataclasses.replace(config.model, device=device)
        tp_size = model_config.tensor_parallel_size
        if not 1 <= rank < tp_size:
            raise ValueError(f"rank must be in [1, {tp_size}) for a TPWorker, got {rank}")
        self.rank = rank
        init_tp_group(init_method, rank, tp_size, torch.device(model_config.resolved_device()), timeout_s)
        try:
            self.runner = ModelRunner(model_config, config.cache, tp_rank=rank)
        except BaseException:
            destroy_tp_group()
            raise
        self.num_steps = 0

    def step(self, ops: list[CacheOp], seqs) -> KVCacheStats:
        """Replay ``ops`` on this rank's cache, then run the forward of ``seqs`` (may be empty: ops only).
        Returns this rank's cache stats after the replay (what rank 0's were when it shipped the step).

        Raises:
            CacheDesyncError: this rank's cache diverged from rank 0's.
        """
        self.runner.kv_cache.replay(ops)
        stats = self.runner.kv_cache.stats()
        if seqs:
            self.runner.run(seqs)
            if self.runner.device.type == "cuda":
                # The next step's replay may unmap pages: the forward reading them must be done.
                torch.cuda.current_stream(self.runner.device).synchronize()
            self.num_steps += 1
        return stats

    def cache_state(self) -> dict:
        """This rank's cache stats and the page ids of every active slot (to compare ranks in tests)."""
        cache = self.runner.kv_cache
        slots = {s: cache.slot_page_ids(s) for s in range(1, cache.config.max_batch_size + 1) if cache.is_active(s)}
        return {
            "rank": self.rank,
            "stats": cache.stats(),
            "slot_page_ids": slots,
            "num_steps": self.num_steps,
            "num_kv_heads": cache.config.num_kv_heads,
        }

    def close(self) -> None:
        """Release the cache and leave the group."""
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.close()
        destroy_tp_group()
