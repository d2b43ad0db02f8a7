"""Exceptions of the KV cache. Each leaves the cache exactly as it was before the call."""


class KVCacheError(Exception):
    """Base class of the cache's errors."""


class NoFreeSlotError(KVCacheError):
    """Every batch slot is owned by a request."""


class SequenceTooLongError(KVCacheError):
    """A slot was asked to hold more tokens than ``max_seq_len``."""


class PoolExhaustedError(KVCacheError):
    """The physical page pool cannot back the request, even after reclaiming deferred pages.

    The scheduler catches this to queue or preempt a request.
    """

    def __init__(self, pages_needed: int, pages_available: int):
        super().__init__(f"need {pages_needed} physical pages, only {pages_available} free or reclaimable")
        self.pages_needed = pages_needed
        self.pages_available = pages_available


class PhysicalMemoryError(KVCacheError):
    """A virtual-memory call of the operating system or the CUDA driver failed."""
