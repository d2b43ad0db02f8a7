"""vAttention KV cache: virtually contiguous per-layer K/V tensors, physical pages mapped on demand."""

from kvcache.cache import RESERVED_SLOT, CacheDesyncError, CacheOp, KVCacheStats, VirtualKVCache, make_physical_memory
from kvcache.config import KVCacheConfig
from kvcache.errors import (
    KVCacheError,
    NoFreeSlotError,
    PhysicalMemoryError,
    PoolExhaustedError,
    SequenceTooLongError,
)
from kvcache.fence import Fence
from kvcache.interface import KVCache
from kvcache.physical_memory import PhysicalMemory

__all__ = [
    "RESERVED_SLOT",
    "CacheDesyncError",
    "CacheOp",
    "Fence",
    "KVCache",
    "KVCacheConfig",
    "KVCacheError",
    "KVCacheStats",
    "NoFreeSlotError",
    "PhysicalMemory",
    "PhysicalMemoryError",
    "PoolExhaustedError",
    "SequenceTooLongError",
    "VirtualKVCache",
    "make_physical_memory",
]
