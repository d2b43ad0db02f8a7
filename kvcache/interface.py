"""The KV cache as the engine sees it: what the scheduler, the model runner, the CUDA graph runner and the attention
backends call. ``VirtualKVCache`` is the implementation; the paged baseline (``benchmarks/paged_kv.py``) is another.

Tensor parallelism's operation log (``record_ops`` / ``take_ops`` / ``replay``) is not part of it: only the
vAttention cache mirrors its decisions on other ranks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch

from kvcache.cache import KVCacheStats
from kvcache.config import KVCacheConfig
from kvcache.fence import Fence


@runtime_checkable
class KVCache(Protocol):
    """One rank's KV cache: batch slots whose rows are backed by a pool of physical pages.

    Attributes:
        config: the shape and budget it was built from.
        k, v: per layer, the K and V tensors the attention backend reads (their shape is the implementation's).
        k_flat, v_flat: per layer, ``[rows, num_kv_heads, head_dim]``, where new K/V are written; which row holds
            a slot's token is the attention backend's metadata (``AttentionBackend.build_metadata``): for the
            vAttention cache ``slot * slot_stride_tokens + t``, for the paged baseline a block table's entry.
        reserved_slot: the slot no request gets; CUDA graphs' padding rows point at it.
        max_request_tokens: the most tokens one request can hold (its slot's length, or the whole pool).
        block_tokens: tokens per block of the prefix cache (the unit a prompt's KV is shared in).
        num_cached_blocks: blocks registered in the prefix cache now.
        num_cached_pages_mapped: pages of cached blocks mapped into requests' slots since the cache was built (0
            for a cache that never maps): host work no token budget counts, which the scheduler bounds per step.
    """

    config: KVCacheConfig
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    k_flat: list[torch.Tensor]
    v_flat: list[torch.Tensor]
    reserved_slot: int
    block_tokens: int
    num_cached_pages_mapped: int

    @property
    def max_request_tokens(self) -> int: ...

    def pages_for_tokens(self, num_tokens: int) -> int:
        """Physical pages (all layers, K and V) that hold ``num_tokens`` tokens of one request."""
        ...

    @property
    def num_cached_blocks(self) -> int: ...

    def can_allocate(self, num_tokens: int, prefix: Sequence[int] = ()) -> bool:
        """Whether :meth:`allocate` of ``num_tokens`` with ``prefix`` would succeed now."""
        ...

    def allocate(self, num_tokens: int, final_tokens: int | None = None, prefix: Sequence[int] = ()) -> int:
        """Give a free slot to a new request, backed for its first ``num_tokens`` tokens (chosen to fit
        ``final_tokens``), the cached blocks ``prefix`` at its start; returns the slot. Raises
        ``SequenceTooLongError``, ``NoFreeSlotError`` or ``PoolExhaustedError``."""
        ...

    def match_prefix(self, keys: Sequence[int]) -> int:
        """How many of the leading block keys are cached."""
        ...

    def cached_keys(self, limit: int, indices: Sequence[int] = (0,)) -> dict[int, list[int]]:
        """For each chain position of ``indices``, up to ``limit`` keys of the blocks cached there, in use or most
        recently used first."""
        ...

    def register(self, slot: int, keys: Sequence[int]) -> int:
        """Register the slot's first ``len(keys)`` blocks (computed in full) for reuse; returns how many of them
        are registered now (fewer: the rest never will be)."""
        ...

    def head_tokens(self, slot: int) -> int:
        """Rows at the start of ``slot`` that are cached blocks, never written."""
        ...

    def grow(self, slot: int, num_tokens: int) -> None:
        """Make the first ``num_tokens`` rows of ``slot`` usable. Raises ``SequenceTooLongError`` or
        ``PoolExhaustedError``, leaving the slot as it was."""
        ...

    def free(self, slot: int) -> None:
        """Return ``slot``; its rows are reused only once the last step that touched it has completed."""
        ...

    def record_use(self, slots: Iterable[int]) -> Fence:
        """After launching a step over ``slots``: their rows stay theirs until the returned fence completes."""
        ...

    def map_ahead(self, next_tokens: Mapping[int, int]) -> int:
        """After launching a step's device work: back ahead what the next step needs (``{slot: tokens it will
        hold}``), best effort, never raising for capacity; returns the pages mapped."""
        ...

    def wait_idle(self) -> None:
        """Block until all device work queued so far has finished."""
        ...

    def stats(self) -> KVCacheStats:
        """Page and slot accounting (admission, routing, metrics)."""
        ...

    def close(self) -> None:
        """Release the memory (the tensors must not be used afterwards); idempotent."""
        ...
