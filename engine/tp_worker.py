"""TPWorker: one tensor-parallel rank > 0 of a replica, in its own process (plain Python; the Ray actor that
hosts it lives in ``deployments.tp_workers``).

It follows rank 0's step messages (``engine.tp_channel``): each replays rank 0's cache operations (so its slots and
pages follow the scheduler's decisions), checks its page accounting against rank 0's, then runs the same forward as
rank 0; the collectives inside the model keep the ranks in step on the device. The host never waits for the device:
the cache waits for a slot's last forward (its fence) before a replayed operation unmaps the slot's pages.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.distributed import DEFAULT_TP_TIMEOUT_S, destroy_tp_group, init_tp_group
from engine.tp_channel import STATE, STEP, STOP, StepReceiver, cache_state, check_stats
from kvcache import CacheOp

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

    def serve(self, channel: StepReceiver) -> None:
        """Follow rank 0's messages until a ``STOP``.

        Raises:
            CacheDesyncError: this rank's cache diverged from rank 0's.
        """
        if self.runner.device.type == "cuda":
            torch.cuda.set_device(self.runner.device)  # this thread's current device
        while True:
            message = channel.recv()
            if message[0] == STOP:
                return
            self._replay(message[1], message[2])
            if message[0] == STATE:
                channel.reply(self.cache_state())
            elif message[0] == STEP:
                if message[3]:
                    self._forward(message[3], message[4])
            else:
                raise ValueError(f"unknown step message {message[0]!r}")

    def _replay(self, ops: list[CacheOp], expected: tuple[int, ...]) -> None:
        self.runner.kv_cache.replay(ops)
        check_stats(self.rank, expected, self.runner.kv_cache.stats())

    def _forward(self, seqs, prev) -> None:
        prev_token_ids = prev_rows = None
        if prev is not None:
            # The previous step's samples, broadcast by rank 0 just before its own forward.
            prev_rows, num_ids, dtype = prev
            prev_token_ids = torch.empty(num_ids, dtype=dtype, device=self.runner.device)
            dist.broadcast(prev_token_ids, src=0)
        self.runner.run(seqs, prev_token_ids, prev_rows)
        # Until this forward is done, a replayed operation does not unmap its slots' pages.
        self.runner.kv_cache.record_use(chunk[0] for chunk in seqs)
        self.num_steps += 1

    def cache_state(self) -> dict:
        """This rank's cache stats and the page ids of every active slot (to compare ranks in tests)."""
        return {**cache_state(self.rank, self.runner.kv_cache), "num_steps": self.num_steps}

    def close(self) -> None:
        """Release the cache and leave the group."""
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.close()
        destroy_tp_group()
