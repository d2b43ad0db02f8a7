"""Free list over the physical pages that a backend created up front."""

from __future__ import annotations

from kvcache.physical_memory import PhysicalMemory


class PagePool:
    """Hands out page ids of a pool whose handles exist from start-up, so the hot path never creates any."""

    def __init__(self, memory: PhysicalMemory, num_pages: int, page_size_bytes: int):
        memory.create_pool(num_pages, page_size_bytes)
        self.num_pages = num_pages
        self.page_size_bytes = page_size_bytes
        # Popped from the end: ascending ids come out first, which keeps runs consecutive and maps cheap.
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def take(self, count: int) -> list[int]:
        """Removes ``count`` pages from the free list; the caller checked there are enough."""
        if count > len(self._free):
            raise ValueError(f"{count} pages asked, {len(self._free)} free")
        if count == 0:
            return []
        taken = self._free[-count:]
        del self._free[-count:]
        taken.reverse()
        return taken

    def give_back(self, page_ids: list[int]) -> None:
        self._free.extend(reversed(page_ids))
