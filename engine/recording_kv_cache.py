"""RecordingKVCache: rank 0's KV cache, recording every state change so that other ranks replay it.

With tensor parallelism every rank holds ``kv_heads / tp`` heads of every layer in its own
``VirtualKVCache`` of identical geometry (same slots, same page counts, same pool size). Admission and
growth are decided once, by the scheduler on rank 0; the other ranks apply the same operations in the same
order. ``VirtualKVCache`` is deterministic (best-fit slot choice, LIFO page free list), so replaying gives
every rank the same slots and the same page ids: :func:`replay_cache_ops` checks the slots.
"""

from __future__ import annotations

from typing import Any, Mapping

CacheOp = tuple  # ("allocate", num_tokens, slot) | ("grow", slot, num_tokens) | ("free", slot)
#                  | ("prepare", {slot: num_tokens}) | ("reclaim",)


class CacheDesyncError(RuntimeError):
    """A rank's cache chose a different slot than rank 0's for the same operation: ranks would write K/V
    to different places, so the replica must stop."""


class RecordingKVCache:
    """Wraps a ``VirtualKVCache``: same interface (reads are forwarded), and ``allocate``, ``grow``,
    ``free``, ``prepare`` and ``reclaim`` that succeed are appended to a log taken by :meth:`take_ops`.
    Failed calls (``PoolExhaustedError`` etc.) leave the cache untouched and are not recorded."""

    def __init__(self, cache) -> None:
        self.cache = cache
        self._ops: list[CacheOp] = []

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not found here: k, v, config, stats, pages_needed, can_allocate, ...
        return getattr(self.cache, name)

    def allocate(self, num_tokens: int) -> int:
        slot = self.cache.allocate(num_tokens)
        self._ops.append(("allocate", int(num_tokens), slot))
        return slot

    def grow(self, slot: int, num_tokens: int) -> None:
        self.cache.grow(slot, num_tokens)
        self._ops.append(("grow", int(slot), int(num_tokens)))

    def free(self, slot: int) -> None:
        self.cache.free(slot)
        self._ops.append(("free", int(slot)))

    def prepare(self, next_tokens: Mapping[int, int]) -> int:
        mapped = self.cache.prepare(next_tokens)
        self._ops.append(("prepare", {int(s): int(n) for s, n in next_tokens.items()}))
        return mapped

    def reclaim(self) -> int:
        unmapped = self.cache.reclaim()
        self._ops.append(("reclaim",))
        return unmapped

    def take_ops(self) -> list[CacheOp]:
        """The operations recorded since the last call, oldest first (and clears the log)."""
        ops, self._ops = self._ops, []
        return ops


def replay_cache_ops(cache, ops: list[CacheOp]) -> None:
    """Apply rank 0's recorded operations to another rank's ``cache``, in order.

    Raises:
        CacheDesyncError: an ``allocate`` chose another slot than rank 0's, or an operation that succeeded
            on rank 0 failed here (the caches' states differ).
    """
    for op in ops:
        kind = op[0]
        try:
            if kind == "allocate":
                slot = cache.allocate(op[1])
                if slot != op[2]:
                    raise CacheDesyncError(f"allocate({op[1]}) gave slot {slot} here, slot {op[2]} on rank 0")
            elif kind == "grow":
                cache.grow(op[1], op[2])
            elif kind == "free":
                cache.free(op[1])
            elif kind == "prepare":
                cache.prepare(op[1])
            elif kind == "reclaim":
                cache.reclaim()
            else:
                raise CacheDesyncError(f"unknown cache operation {op!r}")
        except CacheDesyncError:
            raise
        except Exception as exc:
            raise CacheDesyncError(f"cache operation {op!r} succeeded on rank 0 but failed here: {exc!r}") from exc
