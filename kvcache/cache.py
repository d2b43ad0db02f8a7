"""The vAttention KV cache: per-layer K and V tensors that are virtually contiguous and physically paged.

Layout. Each layer's K (and V) is one tensor ``[max_batch_size, max_seq_len, num_kv_heads, head_dim]`` over a
reserved virtual range. Slot ``i`` (one request) owns rows ``[i * slot_stride_tokens, ...)`` of the flattened
view; ``slot_stride_tokens >= max_seq_len`` is padded so that every slot starts on a page boundary. Physical pages
are mapped at the end of a slot's range, in every layer's K and V at once, as the request grows. Attention kernels
read the dense tensors directly: no block tables.

Reclamation is deferred: a freed slot keeps its pages, the next request takes the free slot whose mapped length
fits it best, and pages are unmapped only when the pool runs short.

The device runs behind the host. Each launched step records a fence over the slots it touches (:meth:`record_use`);
a freed slot's rows are unmapped, or the slot handed to another request, only once its fence is complete. Slot 0 is
reserved: its first page in every buffer stays mapped for the cache's lifetime, so every view's base address is
backed (Triton checks each tensor argument's base pointer at launch), and CUDA graphs point their padding rows at it.

Prefix caching by page aliasing. A *block* is the fewest tokens that fill whole pages (``block_tokens``: 16 tokens
of Llama-3-8B in one 2 MiB page, token-major). A full block of computed tokens can be *registered* under a hash
chained over the tokens before it; its pages then belong to the cache's prefix registry. A new request whose prompt
starts with registered blocks gets them mapped at the start of its slot (the same physical pages at a second virtual
address: no copy, and the kernels still see one dense range), and its prefill starts after them. The blocks at the
start of a slot that belong to the registry are the slot's *head*; a request only writes past its head, so a
registered page is never written again. Blocks no active slot holds stay cached (mapped in the free slots that held
them, or nowhere: physical pages keep their contents when unmapped) and are evicted, least recently used first,
when the pool runs short.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from kvcache.config import DEFAULT_KV_CACHE_MEMORY_FRACTION, KVCacheConfig, batch_slots_for_pool
from kvcache.errors import KVCacheError, NoFreeSlotError, PoolExhaustedError, SequenceTooLongError
from kvcache.fence import Fence
from kvcache.page_pool import PagePool
from kvcache.physical_memory import PhysicalMemory


def make_physical_memory(device: str | torch.device) -> PhysicalMemory:
    """The backend for a device: CUDA virtual memory for "cuda[:N]", host mmap for "cpu"."""
    device = torch.device(device)
    if device.type == "cuda":
        from kvcache.cuda_memory import CudaMemory

        return CudaMemory(device)
    from kvcache.host_memory import HostMemory

    return HostMemory()


RESERVED_SLOT = 0


class CacheDesyncError(KVCacheError):
    """A replayed operation does not fit this cache's state: another rank's cache diverged from rank 0's."""


@dataclass(frozen=True)
class CacheOp:
    """One change of a cache's slots or mappings, as recorded on rank 0 and replayed on the other ranks.

    ``kind``: ``"map"`` / ``"unmap"`` (``count`` pages per buffer at the end of ``slot``), ``"activate"`` (the slot
    is given to a request holding ``count`` tokens), ``"tokens"`` (the slot's request holds ``count`` tokens),
    ``"free"`` (``count`` unused), ``"head"`` (the slot's head becomes the registered blocks ``keys``; ``count``
    1: its other blocks are evicted in place, their pages becoming the slot's own),
    ``"register"`` (the slot's next blocks after its head are registered as ``keys``), ``"evict"`` (the registered
    block ``keys[0]`` is dropped).
    """

    kind: str
    slot: int
    count: int = 0
    keys: tuple[int, ...] = ()


@dataclass(eq=False)
class _Block:
    """A registered block: ``block_pages`` pages per buffer holding ``block_tokens`` computed tokens.

    ``refs``: active slots whose head holds it (never evicted while > 0); ``slots``: every slot, active or free,
    where it is mapped; ``index``: its position in a slot (blocks before it in the chain come first)."""

    key: int
    index: int
    pages: list[list[int]]
    refs: int = 0
    slots: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class KVCacheStats:
    """Page accounting read by the scheduler (admission) and the router (placement).

    ``free_pages + mapped_pages == total_pages``; ``mapped_pages == used_pages + reclaimable_pages``, where
    reclaimable pages are mapped to free slots, beyond an active slot's length (prefetched), or hold cached prefix
    blocks that no active request holds. Whenever no slot is active, ``free_pages + reclaimable_pages ==
    total_pages``. The counts are of physical pages (a page mapped in several slots counts once; a cached block
    mapped nowhere counts as mapped). The reserved slot's pages are in none of these counts.
    A request growing by ``tokens_per_page`` tokens maps one page in each of ``num_buffers`` buffers
    (every layer's K and V).
    """

    total_pages: int
    free_pages: int
    mapped_pages: int
    reclaimable_pages: int
    used_pages: int
    page_size_bytes: int
    tokens_per_page: float
    num_buffers: int
    num_free_slots: int
    num_active_slots: int
    max_batch_size: int

    @property
    def mapped_bytes(self) -> int:
        return self.mapped_pages * self.page_size_bytes

    @property
    def used_bytes(self) -> int:
        return self.used_pages * self.page_size_bytes

    @property
    def usage(self) -> float:
        """Fraction of the pool holding live tokens, 0..1."""
        return self.used_pages / self.total_pages


class VirtualKVCache:
    """One rank's KV cache for every layer, physically backed on demand.

    Slots ``1 .. max_batch_size`` hold requests; slot ``RESERVED_SLOT`` (0) is the cache's own (see the module doc).

    Attributes:
        k, v: per layer, ``[max_batch_size + 1, max_seq_len, num_kv_heads, head_dim]`` views.
        k_flat, v_flat: per layer, the same memory as ``[(max_batch_size + 1) * slot_stride_tokens, num_kv_heads,
            head_dim]``; slot ``i``'s token ``t`` is row ``i * slot_stride_tokens + t``. Dense in the layer-major
            layout; in the token-major one rows are ``2 * num_layers * num_kv_heads * head_dim`` elements apart.
        slot_stride_tokens: rows between consecutive slots in the flat views.
        num_buffers: virtual buffers mapped page by page (``config.num_buffers``).
        token_bytes: bytes of one token in one buffer.
        tokens_per_page: tokens of one buffer per physical page.
        reserved_slot: the slot no request gets; its first ``reserved_tokens`` rows are always mapped.

    Only rows below a slot's mapped length may be touched; anything else faults.
    """

    def __init__(self, config: KVCacheConfig, memory: PhysicalMemory | None = None):
        self.config = config
        self._memory = memory if memory is not None else make_physical_memory(config.device)
        try:
            self._build(config)
        except BaseException:
            self._memory.close()
            raise
        self._finalizer = weakref.finalize(self, self._memory.close)

    def _build(self, config: KVCacheConfig) -> None:
        memory = self._memory
        granularity = memory.granularity_bytes
        page = config.page_size_bytes or granularity
        if page % granularity:
            raise ValueError(f"page_size_bytes must be a multiple of the backend granularity {granularity}, got {page}")
        token_bytes = config.buffer_token_bytes
        self.page_size_bytes = page
        self.token_bytes = token_bytes
        self.tokens_per_page = page / token_bytes
        # The smallest token count whose bytes fill whole pages: slot starts must be page-aligned.
        step = page // math.gcd(page, token_bytes)
        self.slot_stride_tokens = -(-config.max_seq_len // step) * step
        self._slot_bytes = self.slot_stride_tokens * token_bytes
        self.max_pages_per_slot = self._slot_bytes // page  # per buffer
        self.block_tokens = step  # the unit of prefix sharing: whole pages of whole tokens
        self._block_pages = step * token_bytes // page  # per buffer
        self.num_buffers = config.num_buffers
        budget_pages = self._pool_budget_pages(config, page)
        if config.max_batch_size is None:
            config = self.config = replace(config, max_batch_size=batch_slots_for_pool(budget_pages, self.num_buffers))
        num_slots = config.max_batch_size + 1  # the reserved slot first
        self._buffer_bytes = num_slots * self._slot_bytes
        virtual_bytes = self.num_buffers * self._buffer_bytes

        self._reserved_pages = self._pages_per_buffer(1)  # per buffer: a token's row, at least one page
        full = config.max_batch_size * self.max_pages_per_slot * self.num_buffers
        pool_pages = min(budget_pages, full) + self._reserved_pages * self.num_buffers
        self._base = memory.reserve(virtual_bytes)
        self._pool = PagePool(memory, pool_pages, page)

        self.reserved_slot = RESERVED_SLOT
        self._pages: list[list[list[int]]] = [[[] for _ in range(self.num_buffers)] for _ in range(num_slots)]
        self._mapped = [0] * num_slots  # pages per buffer mapped for each slot
        self._num_tokens = [0] * num_slots
        self._active = [False] * num_slots
        self._fence: list[Fence | None] = [None] * num_slots  # the last launched step that touched the slot
        self._heads: list[list[_Block]] = [[] for _ in range(num_slots)]  # registered blocks at each slot's start
        # Each slot's reclaimable pages per buffer (``_own_excess``, kept by ``_update_excess`` whenever its mapped
        # length, tokens, head or state change) and their sum: counting what reclamation can give is O(1), not a
        # pass over every slot in each growth under memory pressure.
        self._own_excess = [0] * num_slots
        self._excess_total = 0
        self._blocks: dict[int, _Block] = {}  # the prefix registry, by chained hash
        # Registered blocks no active slot holds, least recently released first (a slot's deeper blocks before
        # its shallower ones): eviction takes the first, in O(1).
        self._evictable: OrderedDict[int, _Block] = OrderedDict()
        self.num_evicted_blocks = 0
        # Pages of cached blocks mapped into requests' slots since the cache was built: mapping work that costs the
        # step host time but no tokens, which the scheduler bounds per step.
        self.num_cached_pages_mapped = 0
        self._journal: list[CacheOp] | None = None
        self._quiet = 0  # > 0 while a composite change logs itself as one operation
        self._closed = False
        self._map_tail(RESERVED_SLOT, self._reserved_pages)
        self._active[RESERVED_SLOT] = True
        self._num_tokens[RESERVED_SLOT] = self._reserved_pages * page // token_bytes
        self._update_excess(RESERVED_SLOT)
        self.reserved_tokens = self._num_tokens[RESERVED_SLOT]

        raw = memory.as_tensor(self._base, virtual_bytes).view(config.dtype)
        slots, heads, dim, layers = num_slots, config.num_kv_heads, config.head_dim, config.num_layers
        rows = slots * self.slot_stride_tokens
        if config.kv_cache_layout == "layer_major":
            # [K of layer 0, ..., K of layer L-1, V of layer 0, ...], each [rows, H, D]
            grid = raw.view(2, layers, rows, heads, dim)
            flat = [grid[kv, layer] for kv in range(2) for layer in range(layers)]
        else:
            # [rows, L, 2, H, D]: a token's K and V of every layer side by side
            grid = raw.view(rows, layers, 2, heads, dim)
            flat = [grid[:, layer, kv] for kv in range(2) for layer in range(layers)]
        dense = [f.unflatten(0, (slots, self.slot_stride_tokens))[:, : config.max_seq_len] for f in flat]
        self.k, self.v = dense[:layers], dense[layers:]
        self.k_flat, self.v_flat = flat[:layers], flat[layers:]

    def _pool_budget_pages(self, config: KVCacheConfig, page: int) -> int:
        """Pages the memory budget allows, before the cap at what the slots can hold."""
        if config.kv_cache_memory_bytes is not None:
            budget = config.kv_cache_memory_bytes
        else:
            fraction = config.kv_cache_memory_fraction or DEFAULT_KV_CACHE_MEMORY_FRACTION
            budget = int(self._memory.free_memory_bytes() * fraction)
        pages = budget // page
        if pages < self.num_buffers:
            raise ValueError(
                f"the KV pool of {budget} bytes holds {pages} pages of {page} bytes; one request needs at least "
                f"{self.num_buffers} (a page in each buffer): raise kv_cache_memory_bytes or kv_cache_memory_fraction"
            )
        return pages

    # ---- accounting -------------------------------------------------------------------------------------------

    def _pages_per_buffer(self, num_tokens: int) -> int:
        return -(-num_tokens * self.token_bytes // self.page_size_bytes)

    def pages_for_tokens(self, num_tokens: int) -> int:
        """Physical pages (all layers, K and V) that hold ``num_tokens`` tokens of one request."""
        return self._pages_per_buffer(num_tokens) * self.num_buffers

    def _head_pages(self, slot: int) -> int:
        """Pages per buffer at the start of ``slot`` that belong to registered blocks."""
        return len(self._heads[slot]) * self._block_pages

    def _count_excess(self, slot: int) -> int:
        """Pages per buffer a slot holds of its own beyond what its tokens need: every page past its head for a
        free slot. (Its head's pages are the registry's: they go back only by eviction.)"""
        if not self._active[slot]:
            return self._mapped[slot] - self._head_pages(slot)
        return max(0, self._mapped[slot] - max(self._pages_per_buffer(self._num_tokens[slot]), self._head_pages(slot)))

    def _update_excess(self, slot: int) -> None:
        excess = self._count_excess(slot)
        self._excess_total += excess - self._own_excess[slot]
        self._own_excess[slot] = excess

    def _excess(self, slot: int) -> int:
        return self._own_excess[slot]

    def _evictable_pages(self) -> int:
        return len(self._evictable) * self._block_pages * self.num_buffers

    def _spare_pages(self, exclude: int | None = None) -> int:
        """Every slot's own reclaimable pages (but ``exclude``'s): what reclamation takes before any eviction."""
        own = self._excess_total - (self._own_excess[exclude] if exclude is not None else 0)
        return own * self.num_buffers

    def _reclaimable(self, exclude: int | None = None) -> int:
        return self._spare_pages(exclude) + self._evictable_pages()

    def _is_idle(self, slot: int) -> bool:
        """No launched step that touched ``slot`` may still be running."""
        fence = self._fence[slot]
        if fence is not None and fence.is_complete():
            self._fence[slot] = fence = None
        return fence is None

    def _common_head(self, slot: int, blocks: Sequence[_Block]) -> int:
        """How many of ``blocks`` the slot's head already holds, in order."""
        head, common = self._heads[slot], 0
        while common < min(len(head), len(blocks)) and head[common] is blocks[common]:
            common += 1
        return common

    def _eviction_due(self, pages: int, exclude: int | None = None) -> bool:
        """Whether ``pages`` more pages can only come from evicting cached blocks: free and spare pages fall short."""
        return self._pool.num_free_pages + self._spare_pages(exclude) < pages

    def _adopting(self, pages_per_buffer: int, blocks: Sequence[_Block]) -> bool:
        """Whether a new request of ``pages_per_buffer`` with the head ``blocks`` takes over the pages of the cached
        blocks its slot drops (``_set_head``'s ``adopt``): where what it will grow to can only come from
        evictions, the slot's own cached blocks go first, in place (no unmapping, no mapping of fresh pages)."""
        return self._eviction_due((pages_per_buffer - len(blocks) * self._block_pages) * self.num_buffers)

    def _adoptable(self, slot: int, first: int, end: int) -> bool:
        """Whether head blocks ``[first, end)`` of ``slot`` are its alone and held by no request."""
        head = self._heads[slot]
        return end > first and all(not b.refs and b.slots == {slot} for b in head[first:end])

    def _least_recently_used_slot(self, scan: int = 64) -> int | None:
        """The free, idle slot whose cached blocks were released longest ago and are its alone (among the ``scan``
        least recently used blocks), for a request that adopts them: as least-recently-used eviction would take
        them next (a slot's blocks are released together, deepest first)."""
        for _, block in zip(range(scan), self._evictable.values()):
            if len(block.slots) != 1:
                continue
            (slot,) = block.slots
            if not self._active[slot] and self._is_idle(slot) and self._adoptable(slot, 0, len(self._heads[slot])):
                return slot
        return None

    def _choose_slot(self, pages_per_buffer: int, blocks: Sequence[_Block] = (), adopt: bool = False) -> int | None:
        """Among free, idle slots: the one whose head already maps most of ``blocks`` (no remapping), then one with
        no other registered blocks to drop, then best fit: the smallest mapped length that fits, else the largest.
        ``adopt`` (``_adopting``) and no ``blocks``: first the slot ``_least_recently_used_slot`` names. A slot that
        a running step still touches is never handed to another request."""
        if adopt and not blocks:
            slot = self._least_recently_used_slot()
            if slot is not None:
                return slot
        # One pass over the slots on every admission: the cheap tests first, and the fence (a device query) only
        # for a slot that would win.
        best, best_key = None, None
        first = blocks[0] if blocks else None
        heads, mapped_pages = self._heads, self._mapped
        for slot, active in enumerate(self._active):
            if active:
                continue
            head = heads[slot]
            common = self._common_head(slot, blocks) if head and head[0] is first else 0
            mapped = mapped_pages[slot]
            key = (-common, len(head) > common, (0, mapped) if mapped >= pages_per_buffer else (1, -mapped))
            if (best_key is None or key < best_key) and self._is_idle(slot):
                best, best_key = slot, key
        return best

    def _pages_to_allocate(self, slot: int, pages_per_buffer: int, blocks: Sequence[_Block]) -> tuple[int, int]:
        """``(pages to map, pages given back on the way)`` when ``slot`` gets ``blocks`` as its head and
        ``pages_per_buffer`` mapped: a head that differs from ``blocks`` is cut where they part."""
        common = self._common_head(slot, blocks)
        mapped, given_back = self._mapped[slot], 0
        if len(self._heads[slot]) > common or len(blocks) > common:
            cut = common * self._block_pages
            given_back = (mapped - max(cut, self._head_pages(slot))) * self.num_buffers
            mapped = cut
        mapped = max(mapped, len(blocks) * self._block_pages)
        return max(0, pages_per_buffer - mapped) * self.num_buffers, max(0, given_back)

    def can_allocate(self, num_tokens: int, prefix: Sequence[int] = ()) -> bool:
        """Whether :meth:`allocate` of ``num_tokens`` with ``prefix`` would succeed now."""
        if num_tokens > self.config.max_seq_len:
            return False
        blocks = self._lookup(prefix)
        fit = self._pages_per_buffer(num_tokens)
        slot = self._choose_slot(fit, blocks, self._adopting(fit, blocks))
        if slot is None:
            return False
        needed, available = self._allocation_budget(slot, self._pages_per_buffer(num_tokens), blocks)
        return needed <= available

    def _allocation_budget(self, slot: int, pages_per_buffer: int, blocks: Sequence[_Block]) -> tuple[int, int]:
        """``(pages to map, pages that free pages and reclamation can give)`` for ``slot`` to get ``blocks`` as
        its head and ``pages_per_buffer`` mapped. The blocks about to be reused are not evictable for it."""
        needed, given_back = self._pages_to_allocate(slot, pages_per_buffer, blocks)
        reused = sum(1 for b in blocks if b.refs == 0) * self._block_pages * self.num_buffers
        return needed, self._pool.num_free_pages + given_back + self._reclaimable(exclude=slot) - reused

    @property
    def max_request_tokens(self) -> int:
        """Most tokens one more request could hold once every other request has finished: ``max_seq_len``,
        or fewer if the pool, less the pages of the slots allocated now, backs fewer."""
        stats = self.stats()
        pages_per_buffer = (stats.total_pages - stats.used_pages) // self.num_buffers
        return min(self.config.max_seq_len, pages_per_buffer * self.page_size_bytes // self.token_bytes)

    def capacity_tokens(self, slot: int) -> int:
        """Tokens the slot can hold with the pages mapped now."""
        return min(self.config.max_seq_len, self._mapped[slot] * self.page_size_bytes // self.token_bytes)

    def slot_page_ids(self, slot: int) -> list[list[int]]:
        """Physical page ids mapped for ``slot``, per buffer (layer ``l``'s K is buffer ``l``, its V ``L + l``)."""
        return [list(pages) for pages in self._pages[slot]]

    def is_active(self, slot: int) -> bool:
        return self._active[slot]

    def head_tokens(self, slot: int) -> int:
        """Rows at the start of ``slot`` held by registered blocks: shared, never to be written."""
        return len(self._heads[slot]) * self.block_tokens

    def stats(self) -> KVCacheStats:
        """Counts physical pages: a page mapped in several slots counts once; a registered block mapped nowhere
        is held (and reclaimable) all the same."""
        reserved = self._reserved_pages * self.num_buffers
        held = self._pool.num_pages - reserved - self._pool.num_free_pages
        reclaimable = self._reclaimable()
        active = sum(self._active) - 1
        return KVCacheStats(
            total_pages=self._pool.num_pages - reserved,
            free_pages=self._pool.num_free_pages,
            mapped_pages=held,
            reclaimable_pages=reclaimable,
            used_pages=held - reclaimable,
            page_size_bytes=self.page_size_bytes,
            tokens_per_page=self.tokens_per_page,
            num_buffers=self.num_buffers,
            num_free_slots=self.config.max_batch_size - active,
            num_active_slots=active,
            max_batch_size=self.config.max_batch_size,
        )

    # ---- slots ------------------------------------------------------------------------------------------------

    def _check_length(self, num_tokens: int) -> None:
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        if num_tokens > self.config.max_seq_len:
            raise SequenceTooLongError(f"{num_tokens} tokens exceed max_seq_len {self.config.max_seq_len}")

    def _check_slot(self, slot: int) -> None:
        if self._closed:
            raise KVCacheError("the cache is closed")
        if not 0 < slot < len(self._active) or not self._active[slot]:
            raise KVCacheError(f"slot {slot} is not allocated")

    def allocate(self, num_tokens: int, final_tokens: int | None = None, prefix: Sequence[int] = ()) -> int:
        """Gives a free slot to a new request and maps pages for its first ``num_tokens`` tokens.

        ``final_tokens`` (default ``num_tokens``): the tokens the request will hold once its prompt is in, e.g.
        when ``num_tokens`` is only its first prefill chunk; the slot is chosen to fit that best.
        ``prefix``: keys of registered blocks (see :meth:`match_prefix`) whose pages become the slot's first
        ``len(prefix) * block_tokens`` rows; the request must not write them (its computation starts after).

        Raises:
            SequenceTooLongError: ``num_tokens > max_seq_len``.
            KVCacheError: a key of ``prefix`` is not registered, or ``num_tokens`` does not go past the prefix.
            NoFreeSlotError: every slot is taken, or still touched by a running step.
            PoolExhaustedError: not enough free or reclaimable pages.
        """
        if self._closed:
            raise KVCacheError("the cache is closed")
        self._check_length(num_tokens)
        blocks = self._lookup(prefix)
        if len(blocks) != len(prefix):
            raise KVCacheError(f"prefix block {prefix[len(blocks)]:#x} is not cached")
        if blocks and num_tokens <= len(blocks) * self.block_tokens:
            raise KVCacheError(f"{num_tokens} tokens do not go past the {len(blocks) * self.block_tokens} cached")
        fit = self._pages_per_buffer(min(max(num_tokens, final_tokens or 0), self.config.max_seq_len))
        adopt = self._adopting(fit, blocks)
        slot = self._choose_slot(fit, blocks, adopt)
        if slot is None:
            raise NoFreeSlotError(f"all {self.config.max_batch_size} slots are in use or still in flight")
        needed, available = self._allocation_budget(slot, self._pages_per_buffer(num_tokens), blocks)
        if needed > available:
            raise PoolExhaustedError(needed, available)
        for block in blocks:  # not evicted to make room for the request itself
            self._ref(block, +1)
        try:
            self._set_head(slot, blocks, adopt)
            self._ensure_mapped(slot, self._pages_per_buffer(num_tokens))
        finally:
            for block in reversed(blocks):
                self._ref(block, -1)
        self._set_active(slot, num_tokens)
        return slot

    # ---- prefix registry --------------------------------------------------------------------------------------

    def _lookup(self, keys: Sequence[int]) -> list[_Block]:
        blocks = []
        for index, key in enumerate(keys):
            block = self._blocks.get(key)
            if block is None or block.index != index:
                break
            blocks.append(block)
        return blocks

    def match_prefix(self, keys: Sequence[int]) -> int:
        """How many of the leading ``keys`` (chained hashes of a prompt's full blocks) are registered."""
        return len(self._lookup(keys))

    @property
    def num_cached_blocks(self) -> int:
        return len(self._blocks)

    def cached_keys(self, limit: int, indices: Sequence[int] = (0,)) -> dict[int, list[int]]:
        """For each chain position of ``indices``, up to ``limit`` keys of registered blocks there, those in use
        first, then the most recently used: a compact summary of the prefixes this cache holds (position 0 are the
        first blocks of prompts). One pass over the registry, whatever the number of positions."""
        found: dict[int, list[int]] = {index: [] for index in indices}
        in_use = (b for b in self._blocks.values() if b.refs)
        for block in (*in_use, *reversed(self._evictable.values())):
            at_index = found.get(block.index)
            if at_index is not None and len(at_index) < limit:
                at_index.append(block.key)
        return found

    def _ref(self, block: _Block, delta: int) -> None:
        if block.refs == 0 and delta > 0:
            self._evictable.pop(block.key, None)  # absent when the block is being registered
        block.refs += delta
        if block.refs == 0:
            self._evictable[block.key] = block

    def register(self, slot: int, keys: Sequence[int]) -> int:
        """Registers the first ``len(keys)`` blocks of ``slot`` under ``keys``, the chained hashes of their tokens
        (those of its head are registered already). Each must be full of computed tokens: launched steps wrote
        them, and nothing writes them again. Stops at a key registered already (another slot computed the same
        tokens: its copy stays the registry's, this one the slot's own). Returns the length of the slot's head:
        ``< len(keys)`` means no more of this slot's blocks can be registered.

        Raises:
            KVCacheError: ``keys`` do not start with the head's keys.
        """
        self._check_slot(slot)
        head = self._heads[slot]
        # The keys are chained hashes: the last of them both hold matching says every earlier one matches.
        common = min(len(head), len(keys))
        if common and keys[common - 1] != head[common - 1].key:
            raise KVCacheError(f"the keys do not match the registered blocks at the start of slot {slot}")
        limit = min(self._num_tokens[slot], self._mapped[slot] * self.page_size_bytes // self.token_bytes)
        registered = []
        for key in keys[len(head) :]:
            index = len(head)
            if (index + 1) * self.block_tokens > limit or key in self._blocks:
                break
            first = index * self._block_pages
            pages = [list(buf[first : first + self._block_pages]) for buf in self._pages[slot]]
            block = _Block(key, index, pages, slots={slot})
            self._blocks[key] = block
            self._ref(block, +1)
            head.append(block)
            registered.append(key)
        if registered:
            self._update_excess(slot)
        if registered and self._journal is not None:
            self._log("register", slot, keys=tuple(b.key for b in head))
        return len(head)

    def _set_head(self, slot: int, blocks: Sequence[_Block], adopt: bool = False) -> bool:
        """Makes ``blocks`` the head of the free, idle ``slot``: where its head parts from them, the slot is cut
        (its other registered blocks and its own pages after the cut unmapped), then the missing blocks mapped.

        ``adopt`` (``blocks`` all in the head already): the head's other blocks, if no request holds them and no
        other slot maps them, are evicted in place instead: their pages stay mapped as the slot's own (deeper blocks
        without the shallower ones could never be matched again: the keys are chained). This is vAttention's reuse
        of a freed slot's pages, kept under prefix caching. Returns whether it adopted."""
        common = self._common_head(slot, blocks)
        if len(self._heads[slot]) == common and len(blocks) == common:
            return False
        adopt = adopt and len(blocks) == common and self._adoptable(slot, common, len(self._heads[slot]))
        if adopt:
            self._adopt(slot, common)
        else:
            self._quiet += 1
            try:
                self._cut(slot, common)
                missing = blocks[common:]
                if missing:
                    # One mapping of every missing block, buffer by buffer: a chain's pages are often consecutive
                    # ids (a slot's growth takes them in order), and a run of them is one access-setting call.
                    pages = [p for buffer in range(self.num_buffers) for block in missing for p in block.pages[buffer]]
                    self._map_tail(slot, len(missing) * self._block_pages, pages)
                    self.num_cached_pages_mapped += len(pages)
                    for block in missing:
                        self._heads[slot].append(block)
                        block.slots.add(slot)
                    self._update_excess(slot)
            finally:
                self._quiet -= 1
        self._log("head", slot, int(adopt), keys=tuple(b.key for b in blocks))
        return adopt

    def _adopt(self, slot: int, keep_blocks: int) -> None:
        """Evicts the blocks of ``slot``'s head after its first ``keep_blocks`` in place (``_adoptable``): the
        registry forgets them, their pages stay mapped as the slot's own."""
        dropped = self._heads[slot][keep_blocks:]
        for block in dropped:
            del self._blocks[block.key]
            del self._evictable[block.key]
            block.slots.clear()
        self.num_evicted_blocks += len(dropped)
        del self._heads[slot][keep_blocks:]
        self._update_excess(slot)

    def _cut(self, slot: int, keep_blocks: int) -> None:
        """Unmaps everything of ``slot`` after its first ``keep_blocks`` head blocks (the slot must be free and idle
        or be a replaying rank's); its own pages go back to the pool, the registry keeps the blocks."""
        keep = keep_blocks * self._block_pages
        if self._mapped[slot] <= keep:
            return
        own = self._excess(slot) if not self._active[slot] else 0
        if own:
            self._unmap_tail(slot, own)
        dropped = self._heads[slot][keep_blocks:]
        if dropped:
            count = self._mapped[slot] - keep
            for buffer in range(self.num_buffers):
                self._memory.unmap(self._address(buffer, slot, keep), count)
                del self._pages[slot][buffer][keep:]
            for block in dropped:
                block.slots.discard(slot)
            del self._heads[slot][keep_blocks:]
            self._mapped[slot] = keep
            self._update_excess(slot)

    def _evict_one(self, wait: bool = True) -> bool:
        """Drops the least recently released block that no active slot holds: unmapped from the free slots that
        map it, once their steps are done, and its pages freed. Without ``wait``, only if none of those slots is
        still touched by a running step (else nothing is dropped: False)."""
        if not self._evictable:
            return False
        block = next(iter(self._evictable.values()))
        if not wait and not all(self._is_idle(slot) for slot in block.slots):
            return False
        self._evict(block)
        return True

    def _evict(self, block: _Block) -> None:
        self._quiet += 1
        try:
            for slot in sorted(block.slots):
                self._wait_if_busy(slot)
                self._cut(slot, block.index)
            del self._blocks[block.key]
            del self._evictable[block.key]
            self._pool.give_back([p for buf in block.pages for p in buf])
            self.num_evicted_blocks += 1
        finally:
            self._quiet -= 1
        self._log("evict", 0, keys=(block.key,))

    def grow(self, slot: int, num_tokens: int) -> None:
        """Makes the first ``num_tokens`` rows of ``slot`` usable in every layer's K and V.

        Raises:
            SequenceTooLongError, PoolExhaustedError: the slot is left as it was.
        """
        self._check_slot(slot)
        self._check_length(num_tokens)
        if num_tokens * self.token_bytes > self._mapped[slot] * self.page_size_bytes:  # else mapped already
            self._ensure_mapped(slot, self._pages_per_buffer(num_tokens))
        if num_tokens > self._num_tokens[slot]:
            self._set_tokens(slot, num_tokens)

    def free(self, slot: int) -> None:
        """Returns ``slot``; its pages stay mapped for the next request (deferred reclamation), its head's blocks
        stay cached. Steps still running may touch it: its rows are unmapped or handed out only once their fences
        are complete."""
        self._check_slot(slot)
        for block in reversed(self._heads[slot]):  # deeper blocks are evicted first
            self._ref(block, -1)
        self._active[slot] = False
        self._num_tokens[slot] = 0
        self._update_excess(slot)
        self._log("free", slot)

    def record_use(self, slots: Iterable[int]) -> Fence:
        """Marks ``slots`` as touched by the work launched so far (one step's forward): returns the fence after
        that work. Until it completes their rows stay mapped and a freed one is not handed to another request."""
        fence = self._memory.record_fence()
        for slot in slots:
            self._fence[slot] = fence
        return fence

    def wait_idle(self) -> None:
        """Block until all device work queued so far has finished, recorded with :meth:`record_use` or not."""
        self._memory.record_fence().wait()

    def map_ahead(self, next_tokens: Mapping[int, int]) -> int:
        """Maps ahead what the next iteration needs: ``{slot: tokens it will hold}``, then prefetches.

        Called once per iteration after the device work of the current one is launched, so that the driver
        calls overlap it. Best effort: never raises for capacity, never waits for the device, and leaves whatever
        it could not map to :meth:`grow`. The next iteration's need may take free pages, pages of idle free slots
        and cached blocks no request holds (least recently used first, as :meth:`grow` would evict them a moment
        later on the step's critical path); prefetching (up to ``prefetch_tokens`` beyond the need, slots nearest
        to their next page first, at most ``prefetch_pages_per_step`` pages) takes free pages only. Returns the
        pages mapped.
        """
        if self._closed:
            return 0
        mapped = 0
        budget = None  # pages per buffer that free pages, free slots' pages and evictions may give; counted once
        token_bytes, page, active, mapped_pages = self.token_bytes, self.page_size_bytes, self._active, self._mapped
        for slot, num_tokens in next_tokens.items():
            # Called every step for every running slot: the common case (already mapped) in plain arithmetic.
            if not active[slot] or num_tokens * token_bytes <= mapped_pages[slot] * page:
                continue
            missing = self._pages_per_buffer(min(num_tokens, self.config.max_seq_len)) - mapped_pages[slot]
            if missing <= 0:
                continue
            if budget is None:  # free slots still in flight are left alone: map_ahead never waits for the device
                budget = (self._pool.num_free_pages + self._evictable_pages()) // self.num_buffers + sum(
                    self._excess(s) for s, active in enumerate(self._active) if not active and self._is_idle(s)
                )
            count = min(missing, budget)
            if count <= 0:
                break
            # Cached blocks only where nothing else could give the pages (grow would take in-flight free slots' and
            # active slots' spare pages first, waiting for the former).
            evict = self._eviction_due(count * self.num_buffers, exclude=slot)
            self._reclaim(count * self.num_buffers, exclude=slot, free_slots_only=True, wait=False, evict=evict)
            count = min(count, self._pool.num_free_pages // self.num_buffers)  # what it could reclaim without waiting
            if count <= 0:
                break
            self._map_tail(slot, count)
            budget -= count
            mapped += count * self.num_buffers
        return mapped + self._prefetch(next_tokens)

    def _prefetch(self, next_tokens: Mapping[int, int]) -> int:
        """Maps pages within ``prefetch_tokens`` of the slots' next needs, nearest first, from free pages only and
        at most half of them: the rest stays for growth and admissions, which would otherwise unmap prefetched
        pages again under memory pressure.

        With hysteresis: a slot is topped up to the whole window only once fewer than half of it is mapped ahead,
        so that its pages come several to a call (one access-setting driver call and one pass of bookkeeping for
        the run, instead of one per page as the window slides token by token)."""
        window = self.config.prefetch_tokens
        if window == 0:
            return 0
        low_water = (window + 1) // 2
        token_bytes, page, max_len = self.token_bytes, self.page_size_bytes, self.config.max_seq_len
        wanted = []  # (tokens before the first unmapped row is needed, slot, pages per buffer to map)
        for slot, num_tokens in next_tokens.items():
            capacity = self._mapped[slot] * page  # bytes per buffer mapped for the slot
            if not self._active[slot] or min(num_tokens + low_water, max_len) * token_bytes <= capacity:
                continue
            missing = self._pages_per_buffer(min(num_tokens + window, max_len)) - self._mapped[slot]
            if missing > 0:
                wanted.append((capacity / token_bytes - num_tokens, slot, missing))
        limit = self.config.prefetch_pages_per_step
        rows = self._pool.num_free_pages // self.num_buffers // 2
        if limit is not None:
            rows = min(rows, max(1, limit // self.num_buffers))
        mapped = 0
        for _, slot, missing in sorted(wanted):
            count = min(missing, rows)
            if count <= 0:
                break
            self._map_tail(slot, count)
            rows -= count
            mapped += count * self.num_buffers
        return mapped

    def reclaim(self) -> int:
        """Frees every reclaimable page now (free slots' pages, pages prefetched past a slot's length, cached
        blocks no request holds), e.g. to hand memory back or to measure from a cold cache. Returns the pages
        freed."""
        if self._closed:
            raise KVCacheError("the cache is closed")
        before = self._pool.num_free_pages
        while self._evict_one():
            pass
        for slot in range(len(self._active)):
            count = self._excess(slot)
            if count:
                self._wait_if_busy(slot)
                self._unmap_tail(slot, count)
        return self._pool.num_free_pages - before

    # ---- mapping ----------------------------------------------------------------------------------------------

    def _address(self, buffer: int, slot: int, page_index: int) -> int:
        return self._base + buffer * self._buffer_bytes + slot * self._slot_bytes + page_index * self.page_size_bytes

    def _ensure_mapped(self, slot: int, pages_per_buffer: int) -> None:
        missing = pages_per_buffer - self._mapped[slot]
        if missing <= 0:
            return
        needed = missing * self.num_buffers
        available = self._pool.num_free_pages + self._reclaimable(exclude=slot)
        if needed > available:
            raise PoolExhaustedError(needed, available)
        self._reclaim(needed, exclude=slot, wait=True)
        self._map_tail(slot, missing)

    def _reclaim(
        self, pages: int, exclude: int, free_slots_only: bool = False, wait: bool = True, evict: bool = True
    ) -> None:
        """Unmaps pages until ``pages`` are free: idle free slots' own pages first (largest first), then active
        slots' pages beyond their tokens (no launched step touches those), then free slots still in flight, after
        waiting for their fences (``wait``; else they are skipped), then cached blocks no request holds, least
        recently used first (``evict``; without ``wait``, while the next one's free slots are idle)."""
        deficit = pages - self._pool.num_free_pages
        if deficit <= 0:
            return
        self._reclaim_own(deficit, exclude, free_slots_only, wait)
        while evict and pages > self._pool.num_free_pages and self._evict_one(wait):
            pass

    def _reclaim_own(self, deficit: int, exclude: int, free_slots_only: bool, wait: bool) -> None:
        def order(s: int) -> tuple:
            group = 1 if self._active[s] else (0 if self._is_idle(s) else 2)
            return group, -self._excess(s)

        excess = self._own_excess
        candidates = sorted((s for s in range(len(excess)) if excess[s] > 0 and s != exclude), key=order)
        for slot in candidates:
            if deficit <= 0:
                break
            if free_slots_only and self._active[slot]:
                continue
            if not wait and not self._active[slot] and not self._is_idle(slot):
                continue
            self._wait_if_busy(slot)
            count = min(self._excess(slot), -(-deficit // self.num_buffers))
            self._unmap_tail(slot, count)
            deficit -= count * self.num_buffers

    def _wait_if_busy(self, slot: int) -> None:
        """Wait for the last step that touched a free ``slot``; an active slot's pages beyond its tokens were
        touched by no step and need no wait."""
        if not self._active[slot] and not self._is_idle(slot):
            self._fence[slot].wait()
            self._fence[slot] = None

    def _map_tail(self, slot: int, count: int, page_ids: list[int] | None = None) -> None:
        """Maps ``count`` more pages at the end of ``slot`` in every buffer, from the pool or ``page_ids``
        (``count`` per buffer, buffer by buffer); all or nothing."""
        from_pool = page_ids is None
        if from_pool:
            page_ids = self._pool.take(count * self.num_buffers)
        start = self._mapped[slot]
        done = 0
        try:
            for buffer in range(self.num_buffers):
                self._memory.map(self._address(buffer, slot, start), page_ids[buffer * count : (buffer + 1) * count])
                done += 1
        except BaseException:
            for buffer in range(done):
                self._memory.unmap(self._address(buffer, slot, start), count)
            if from_pool:
                self._pool.give_back(page_ids)
            raise
        for buffer in range(self.num_buffers):
            self._pages[slot][buffer].extend(page_ids[buffer * count : (buffer + 1) * count])
        self._mapped[slot] = start + count
        self._update_excess(slot)
        self._log("map", slot, count)

    def _unmap_tail(self, slot: int, count: int) -> None:
        """Unmaps the last ``count`` pages of ``slot``, its own (never its head's), back to the pool."""
        start = self._mapped[slot] - count
        if slot == RESERVED_SLOT or start < (
            self._pages_per_buffer(self._num_tokens[slot]) if self._active[slot] else 0
        ):
            raise KVCacheError(f"unmapping pages of slot {slot} that hold its tokens")
        if start < self._head_pages(slot):
            raise KVCacheError(f"unmapping registered pages of slot {slot} as its own")
        if not self._active[slot] and not self._is_idle(slot):
            raise KVCacheError(f"unmapping pages of slot {slot} under a step that may still touch them")
        for buffer in range(self.num_buffers):
            self._memory.unmap(self._address(buffer, slot, start), count)
            pages = self._pages[slot][buffer]
            self._pool.give_back(pages[start:])
            del pages[start:]
        self._mapped[slot] = start
        self._update_excess(slot)
        self._log("unmap", slot, count)

    def _set_active(self, slot: int, num_tokens: int) -> None:
        for block in self._heads[slot]:
            self._ref(block, +1)
        self._active[slot] = True
        self._num_tokens[slot] = num_tokens
        self._update_excess(slot)
        self._log("activate", slot, num_tokens)

    def _set_tokens(self, slot: int, num_tokens: int) -> None:
        self._num_tokens[slot] = num_tokens
        self._update_excess(slot)
        self._log("tokens", slot, num_tokens)

    # ---- tensor parallelism: rank 0 records, the other ranks replay ------------------------------------------

    def _log(self, kind: str, slot: int, count: int = 0, keys: tuple[int, ...] = ()) -> None:
        if self._journal is not None and not self._quiet:
            self._journal.append(CacheOp(kind, slot, count, keys))

    def record_ops(self) -> None:
        """From now on, record every change of slots and mappings for :meth:`take_ops` (rank 0 under tensor
        parallelism: the other ranks replay rank 0's decisions, which depend on its fences)."""
        if self._journal is None:
            self._journal = []

    def take_ops(self) -> list[CacheOp]:
        """The changes recorded since the last call, oldest first (and clears the log)."""
        if self._journal is None:
            return []
        ops, self._journal = self._journal, []
        return ops

    def replay(self, ops: Iterable[CacheOp]) -> None:
        """Applies another rank's recorded changes to this cache, in order. Pages of a free slot are unmapped only
        once this rank's own last step over the slot is complete (the fences given by :meth:`record_use`), as on
        the rank that recorded them. With the same history, the page free lists give every rank the same page ids.

        Raises:
            CacheDesyncError: an operation does not fit this cache's state.
        """
        for op in ops:
            slot = op.slot
            if op.kind == "evict":
                block = self._blocks.get(op.keys[0]) if op.keys else None
                if block is None or block.refs:
                    raise CacheDesyncError(f"{op}: no such block, or held here")
                self._evict(block)
                continue
            if not 0 < slot < len(self._active):
                raise CacheDesyncError(f"{op}: no such slot")
            active = self._active[slot]
            if op.kind == "map":
                if self._mapped[slot] + op.count > self.max_pages_per_slot:
                    raise CacheDesyncError(f"{op}: beyond the slot")
                if op.count * self.num_buffers > self._pool.num_free_pages:
                    raise CacheDesyncError(f"{op}: {self._pool.num_free_pages} pages free here")
                self._map_tail(slot, op.count)
            elif op.kind == "unmap":
                if op.count > self._mapped[slot]:
                    raise CacheDesyncError(f"{op}: only {self._mapped[slot]} pages mapped here")
                self._wait_if_busy(slot)
                self._unmap_tail(slot, op.count)
            elif op.kind == "activate":
                if active:
                    raise CacheDesyncError(f"{op}: the slot is already active here")
                self._wait_if_busy(slot)  # its pages beyond the new request's tokens may be unmapped next
                self._set_active(slot, op.count)
            elif op.kind == "tokens":
                if not active:
                    raise CacheDesyncError(f"{op}: the slot is not active here")
                self._set_tokens(slot, op.count)
            elif op.kind == "free":
                if not active:
                    raise CacheDesyncError(f"{op}: the slot is not active here")
                self.free(slot)
            elif op.kind == "head":
                blocks = self._lookup(op.keys)
                if active or len(blocks) != len(op.keys):
                    raise CacheDesyncError(f"{op}: the slot is active or a block is not cached here")
                self._wait_if_busy(slot)
                if self._set_head(slot, blocks, bool(op.count)) != bool(op.count):
                    raise CacheDesyncError(f"{op}: the blocks to adopt are not the slot's alone here")
            elif op.kind == "register":
                if not active or self.register(slot, list(op.keys)) != len(op.keys):
                    raise CacheDesyncError(f"{op}: the blocks cannot be registered here")
            else:
                raise CacheDesyncError(f"unknown cache operation {op!r}")

    # ---- teardown ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Unmaps and releases all memory. The tensors must not be used afterwards. Idempotent."""
        if self._closed:
            return
        self.wait_idle()  # no kernel may touch the memory after it is gone
        self._closed = True
        self.k = self.v = self.k_flat = self.v_flat = []
        self._finalizer()

    def __enter__(self) -> VirtualKVCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
