"""The seam between the cache and the operating system or driver that backs it with memory."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from kvcache.fence import Fence


class PhysicalMemory(ABC):
    """Reserves virtual address ranges and maps pages of a pool of physical memory into them.

    Pages are numbered ``0 .. num_pages - 1`` and created once by :meth:`create_pool`; the hot path
    only maps and unmaps them.
    """

    device: torch.device

    @property
    @abstractmethod
    def granularity_bytes(self) -> int:
        """Smallest page the backend can map; page sizes are multiples of it."""

    @abstractmethod
    def free_memory_bytes(self) -> int:
        """Memory that a new pool could take right now."""

    @abstractmethod
    def reserve(self, size_bytes: int) -> int:
        """Reserves ``size_bytes`` of virtual addresses, backed by nothing; returns the base address."""

    @abstractmethod
    def create_pool(self, num_pages: int, page_size_bytes: int) -> None:
        """Creates the physical pages up front."""

    @abstractmethod
    def map(self, address: int, page_ids: Sequence[int]) -> None:
        """Maps ``page_ids`` at consecutive pages starting at ``address`` (page-aligned), read-write."""

    @abstractmethod
    def unmap(self, address: int, num_pages: int) -> None:
        """Unmaps ``num_pages`` consecutive pages starting at ``address``; the pages stay in the pool."""

    @abstractmethod
    def as_tensor(self, address: int, size_bytes: int) -> torch.Tensor:
        """A 1-D uint8 tensor over ``[address, address + size_bytes)`` without touching the memory."""

    @abstractmethod
    def record_fence(self) -> Fence:
        """A fence after the work launched so far on the device (see ``kvcache.fence``)."""

    @abstractmethod
    def close(self) -> None:
        """Unmaps everything, releases the pool and the reservations. Idempotent."""


def page_runs(page_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """Splits ``page_ids`` into runs of consecutive ids: ``(position, first_id, length)``."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(page_ids) + 1):
        if i == len(page_ids) or page_ids[i] != page_ids[i - 1] + 1:
            runs.append((start, page_ids[start], i - start))
            start = i
    return runs
