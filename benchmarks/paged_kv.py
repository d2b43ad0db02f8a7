"""Benchmark-only paged-KV mode of the engine: the baseline the vAttention cache is measured against.

What it is. The same ``LLMEngine`` — scheduler, asynchronous scheduling, CUDA graphs, sampler, model, fused Triton
layers — with only the KV layout and its addressing swapped for vLLM's:

* ``PagedKVCache``: per layer a K and a V tensor ``[num_blocks * BLOCK_SIZE_TOKENS, Hkv, D]`` allocated up front with
  ``torch.empty`` (plain device memory, no virtual-memory tricks), blocks of 16 tokens (vLLM's default), a free-block
  queue, per-slot block lists and a device block table ``[max_batch_size, max_blocks_per_seq]`` int32. The pool gets
  the same bytes the vAttention cache would (``kv_cache_memory_bytes``, or ``kv_cache_memory_fraction`` of the free memory).
* ``PagedAttentionBackend``: K/V rows are written at ``table[slot, pos // 16] * 16 + pos % 16``, computed on the
  device; decode attention is ``benchmarks/triton_paged_decode.py``, the twin of the product's split-KV kernel that
  differs only in reading each tile's rows through the block table (same tiles, autotune space and split plan).
* ``build_paged_engine(config)``: an ``LLMEngine`` over both, through the ``LocalExecutor`` / ``ModelRunner`` hook
  (``kv_cache_factory``, ``attention_backend``).

What it is not: vLLM. Differences that matter when reading its figures:

* Prefill and the prefill chunks of mixed batches: where FlashInfer is importable, its paged prefill kernel (FA3 on
  Hopper) reads the blocks in place, as in vLLM and SGLang on this GPU, and the vAttention engine runs the same
  kernel over its slots (``engine/attention/flashinfer.py``). Without it (or with ``prefill_kernel="gather"``,
  ``GatherPrefillPagedBackend``) each sequence's K/V (context + new tokens) is gathered through its block table into
  contiguous temporaries for the FA2 varlen call of ``engine/attention/torch_flash.py`` (torch's FA2 takes a
  ``block_table`` only for blocks of 256 tokens): an extra read + write of the prefilled sequences' K/V per layer
  that flatters vAttention on prefill-heavy work. Decode rows of a mixed batch go through the paged decode kernel
  in both engines.
* No prefix caching, no block sharing, no swapping: recompute preemption exactly as the product's scheduler does.
* Blocks are allocated when the scheduler grows a slot (as vLLM allocates in its scheduler); nothing is prefetched,
  and a finished request's blocks return to the free queue at once (no deferred reclamation).
* Without a 16-bit CUDA device (CPU tests, float32), attention runs in torch over K/V gathered through the table
  (decode: padded to the batch's ``max_seq_len`` and masked, so that it can be captured in a CUDA graph).

Page accounting. ``KVCacheStats`` counts a "page" as one 16-token block of one layer's K or V, so that
``num_buffers = 2 * num_layers`` pages hold 16 tokens of a request, as with vAttention's pages, and
``free + mapped == total``; nothing is ever reclaimable.
"""

from __future__ import annotations

import heapq
import os
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import chain, repeat
from typing import Any

import torch
import torch.nn.functional as F

from engine.attention.backend import AttentionBackend, store_kv
from engine.attention.flashinfer import PagedPrefill
from engine.batch import ForwardBatch, to_device
from engine.config import EngineConfig
from engine.executor import LocalExecutor
from engine.llm_engine import LLMEngine
from kvcache import (
    KVCacheConfig,
    KVCacheError,
    KVCacheStats,
    NoFreeSlotError,
    PoolExhaustedError,
    VirtualKVCache,
)
from kvcache.config import DEFAULT_KV_CACHE_MEMORY_FRACTION, batch_slots_for_pool
from kvcache.fence import CudaFence, Fence, HostTimeline

BLOCK_SIZE_TOKENS = 16  # vLLM's default block size on CUDA


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class PagedKVCache:
    """A vLLM-style block pool with ``VirtualKVCache``'s interface (what the scheduler, engine and runners use).

    Attributes:
        k_flat, v_flat: per layer, ``[num_blocks * BLOCK_SIZE_TOKENS, Hkv, D]``; block ``b`` is rows
            ``[b * 16, (b + 1) * 16)``.
        k, v: the same memory as ``[num_blocks, BLOCK_SIZE_TOKENS, Hkv, D]`` (vLLM's layout). Not the vAttention
            ``[max_batch_size, max_seq_len, Hkv, D]`` view: only ``PagedAttentionBackend`` can read this cache.
        block_table: ``[max_batch_size, max_blocks_per_seq]`` int32 on the device: ``block_table[slot, j]`` holds
            tokens ``[16 j, 16 (j + 1))`` of ``slot``. Current for the next forward after ``commit_block_table()``.
        num_blocks: blocks in the pool (each holds 16 tokens of every layer's K and V).
        page_size_bytes, tokens_per_page, num_buffers, token_bytes: as ``VirtualKVCache``'s, a page being one block
            of one buffer (one layer's K or V).
    """

    def __init__(self, config: KVCacheConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.block_size = BLOCK_SIZE_TOKENS
        self.token_bytes = config.token_bytes
        self.num_buffers = 2 * config.num_layers
        self.page_size_bytes = BLOCK_SIZE_TOKENS * self.token_bytes
        self.tokens_per_page = float(BLOCK_SIZE_TOKENS)
        self.max_blocks_per_seq = _cdiv(config.max_seq_len, BLOCK_SIZE_TOKENS)
        self.num_blocks = self._pool_blocks(config)
        config = self.config  # max_batch_size resolved

        rows = (self.num_blocks + 1) * BLOCK_SIZE_TOKENS  # one more block for the reserved slot
        heads, dim = config.num_kv_heads, config.head_dim
        self.k_flat = [
            torch.empty(rows, heads, dim, dtype=config.dtype, device=self.device) for _ in range(config.num_layers)
        ]
        self.v_flat = [
            torch.empty(rows, heads, dim, dtype=config.dtype, device=self.device) for _ in range(config.num_layers)
        ]
        self.k = [t.view(-1, BLOCK_SIZE_TOKENS, heads, dim) for t in self.k_flat]
        self.v = [t.view(-1, BLOCK_SIZE_TOKENS, heads, dim) for t in self.v_flat]

        slots = config.max_batch_size + 1  # slot 0 is the reserved slot, as in the vAttention cache
        # The host table is the truth; the device copy is brought up to date, stream-ordered, by commit_block_table.
        # Entries past a slot's blocks keep stale (always valid) block ids: the kernels mask them out.
        self._table_cpu = torch.zeros(slots, self.max_blocks_per_seq, dtype=torch.int32)
        self._table_np = self._table_cpu.numpy()
        if self.device.type == "cuda":
            self.block_table = torch.zeros_like(self._table_cpu, device=self.device)
            # Two pinned staging tables used in turn, so that the host never rewrites memory a copy still waits to
            # read (the copy is queued behind the step in flight); an event says when a staging table is free.
            self._staging = [torch.zeros_like(self._table_cpu).pin_memory() for _ in range(2)]
            self._copied = [torch.cuda.Event(), torch.cuda.Event()]
            self._turn = 0
        else:
            self.block_table = self._table_cpu
        self._dirty: tuple[int, int] | None = None  # [first, last + 1) table rows changed since the last commit

        self._free_blocks: deque[int] = deque(range(self.num_blocks))  # FIFO, as vLLM's free block queue
        self._blocks: list[list[int]] = [[] for _ in range(slots)]
        self._num_tokens = [0] * slots
        self._active = [False] * slots
        self._free_slots = list(range(1, slots))  # a heap: the lowest free slot first
        self._closed = False
        # The reserved slot (CUDA graphs' padding rows) holds the last block, outside the pool and the accounting.
        self.reserved_slot = 0
        self._active[0] = True
        self._num_tokens[0] = 1
        self._blocks[0] = [self.num_blocks]
        self._table_np[0, 0] = self.num_blocks
        self._dirty = (0, 1)

    def _pool_blocks(self, config: KVCacheConfig) -> int:
        """Blocks in the pool; sizes ``max_batch_size`` from them when it is None, as the vAttention cache does."""
        block_bytes = self.page_size_bytes * self.num_buffers
        if config.kv_cache_memory_bytes is not None:
            budget = config.kv_cache_memory_bytes
        else:
            fraction = config.kv_cache_memory_fraction or DEFAULT_KV_CACHE_MEMORY_FRACTION
            if self.device.type == "cuda":
                free = torch.cuda.mem_get_info(self.device)[0]
            else:
                free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            budget = int(free * fraction)
        if config.max_batch_size is None:
            config = self.config = replace(config, max_batch_size=batch_slots_for_pool(budget // block_bytes, 1))
        blocks = min(budget // block_bytes, config.max_batch_size * self.max_blocks_per_seq)
        if blocks < 1:
            raise ValueError(
                f"the KV pool of {budget} bytes holds no block of {block_bytes} bytes "
                f"({BLOCK_SIZE_TOKENS} tokens of every layer's K and V): raise kv_cache_memory_bytes or "
                "kv_cache_memory_fraction"
            )
        return blocks

    # ---- accounting -------------------------------------------------------------------------------------------

    def pages_for_tokens(self, num_tokens: int) -> int:
        """Pages (blocks of every layer's K and V) that hold ``num_tokens`` tokens of one request."""
        return _cdiv(num_tokens, BLOCK_SIZE_TOKENS) * self.num_buffers

    def record_use(self, slots) -> Fence:
        """A fence after the work launched so far. Freed blocks go back to the queue at once: they are only ever
        rewritten by later, stream-ordered kernels (nothing is unmapped)."""
        return CudaFence(self.device) if self.device.type == "cuda" else HostTimeline().record()

    def wait_idle(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # No prefix caching in the baseline: nothing is ever cached, nothing registered.
    block_tokens = BLOCK_SIZE_TOKENS
    num_cached_blocks = 0
    num_cached_pages_mapped = 0

    def match_prefix(self, keys: Sequence[int]) -> int:
        return 0

    def cached_keys(self, limit: int, indices: Sequence[int] = (0,)) -> dict[int, list[int]]:
        return {index: [] for index in indices}

    def register(self, slot: int, keys: Sequence[int]) -> int:
        return 0

    def head_tokens(self, slot: int) -> int:
        return 0

    def can_allocate(self, num_tokens: int, prefix: Sequence[int] = ()) -> bool:
        """Whether :meth:`allocate` of ``num_tokens`` would succeed now."""
        return (
            not prefix
            and 0 <= num_tokens <= self.config.max_seq_len
            and bool(self._free_slots)
            and _cdiv(num_tokens, BLOCK_SIZE_TOKENS) <= len(self._free_blocks)
        )

    @property
    def max_request_tokens(self) -> int:
        """Most tokens one more request could hold once every other request has finished (slots the runner keeps
        for itself, the reserved slot, still hold theirs)."""
        used = self.num_blocks - len(self._free_blocks)
        return min(self.config.max_seq_len, (self.num_blocks - used) * BLOCK_SIZE_TOKENS)

    def capacity_tokens(self, slot: int) -> int:
        """Tokens the slot can hold with the blocks it has now."""
        return min(self.config.max_seq_len, len(self._blocks[slot]) * BLOCK_SIZE_TOKENS)

    def slot_block_ids(self, slot: int) -> list[int]:
        """The blocks of ``slot``, in token order."""
        return list(self._blocks[slot])

    def is_active(self, slot: int) -> bool:
        return self._active[slot]

    def stats(self) -> KVCacheStats:
        used = (self.num_blocks - len(self._free_blocks)) * self.num_buffers
        active = sum(self._active) - 1
        return KVCacheStats(
            total_pages=self.num_blocks * self.num_buffers,
            free_pages=len(self._free_blocks) * self.num_buffers,
            mapped_pages=used,
            reclaimable_pages=0,
            used_pages=used,
            page_size_bytes=self.page_size_bytes,
            tokens_per_page=self.tokens_per_page,
            num_buffers=self.num_buffers,
            num_free_slots=self.config.max_batch_size - active,
            num_active_slots=active,
            max_batch_size=self.config.max_batch_size,
        )

    # ---- slots ------------------------------------------------------------------------------------------------

    # The same argument checks as the vAttention cache (they read config, _closed and _active only).
    _check_length = VirtualKVCache._check_length
    _check_slot = VirtualKVCache._check_slot

    def _check_blocks(self, count: int) -> None:
        if count > len(self._free_blocks):
            raise PoolExhaustedError(count * self.num_buffers, len(self._free_blocks) * self.num_buffers)

    def allocate(self, num_tokens: int, final_tokens: int | None = None, prefix: Sequence[int] = ()) -> int:
        """Gives the lowest free slot to a new request, with blocks for its first ``num_tokens`` tokens
        (``final_tokens`` is the vAttention cache's slot-fit hint: every slot fits here; ``prefix`` must be
        empty: nothing is cached).

        Raises:
            SequenceTooLongError, NoFreeSlotError, PoolExhaustedError: the cache is left as it was.
        """
        if self._closed:
            raise KVCacheError("the cache is closed")
        if prefix:
            raise KVCacheError("the paged baseline caches no prefix")
        self._check_length(num_tokens)
        if not self._free_slots:
            raise NoFreeSlotError(f"all {len(self._active)} slots are in use")
        count = _cdiv(num_tokens, BLOCK_SIZE_TOKENS)
        self._check_blocks(count)
        slot = heapq.heappop(self._free_slots)
        self._active[slot] = True
        self._num_tokens[slot] = num_tokens
        self._append_blocks(slot, count)
        return slot

    def grow(self, slot: int, num_tokens: int) -> None:
        """Gives ``slot`` the blocks for its first ``num_tokens`` tokens.

        Raises:
            SequenceTooLongError, PoolExhaustedError: the slot is left as it was.
        """
        self._check_slot(slot)
        self._check_length(num_tokens)
        missing = _cdiv(num_tokens, BLOCK_SIZE_TOKENS) - len(self._blocks[slot])
        if missing > 0:
            self._check_blocks(missing)
            self._append_blocks(slot, missing)
        self._num_tokens[slot] = max(self._num_tokens[slot], num_tokens)

    def free(self, slot: int) -> None:
        """Returns ``slot`` and its blocks at once. A step in flight still reads the device table it was launched
        with (table updates are stream-ordered copies) and its blocks are rewritten only by later kernels."""
        self._check_slot(slot)
        self._free_blocks.extend(self._blocks[slot])
        self._blocks[slot] = []
        self._active[slot] = False
        self._num_tokens[slot] = 0
        heapq.heappush(self._free_slots, slot)

    def map_ahead(self, next_tokens: Mapping[int, int]) -> int:
        """Nothing to map ahead: blocks are taken when the scheduler grows a slot. Returns 0."""
        return 0

    def reclaim(self) -> int:
        """Nothing is ever held beyond a request's needs. Returns 0."""
        if self._closed:
            raise KVCacheError("the cache is closed")
        return 0

    def _append_blocks(self, slot: int, count: int) -> None:
        if count == 0:
            return
        blocks = self._blocks[slot]
        new = [self._free_blocks.popleft() for _ in range(count)]
        self._table_np[slot, len(blocks) : len(blocks) + count] = new
        blocks.extend(new)
        lo, hi = self._dirty if self._dirty is not None else (slot, slot + 1)
        self._dirty = (min(lo, slot), max(hi, slot + 1))

    def commit_block_table(self) -> None:
        """Queues the copy of the table rows changed since the last commit to the device, on the current stream,
        without waiting for the device: a step launched before sees the table it was launched with, the next forward
        sees the new one. Called before every forward (``PagedExecutor.run``, and the backend's eager forwards)."""
        if self._dirty is None:
            return
        lo, hi = self._dirty
        self._dirty = None
        if self.device.type != "cuda":
            return  # the table is the host tensor itself
        self._turn ^= 1
        # The copy out of this staging table was queued two commits ago, before a step the host has since waited
        # for: in practice this never blocks.
        self._copied[self._turn].synchronize()
        staging = self._staging[self._turn]
        staging[lo:hi].copy_(self._table_cpu[lo:hi])
        self.block_table[lo:hi].copy_(staging[lo:hi], non_blocking=True)
        self._copied[self._turn].record()

    # ---- teardown ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Drops the pool's tensors. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.k = self.v = self.k_flat = self.v_flat = []

    def __enter__(self) -> PagedKVCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class _DecodeRows:
    """Sequences with one query token. ``q_index [Nd]`` int64 (their rows of ``q``; None: every row),
    ``block_tables [Nd, max_blocks_per_seq]`` int32, ``seq_lens [Nd]`` int32, ``max_seq_len`` a host bound."""

    q_index: torch.Tensor | None
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    max_seq_len: int


@dataclass(frozen=True)
class _PrefillRows:
    """Sequences with several query tokens. ``q_index [Tp]`` int64 (their rows of ``q``), ``key_rows [Kp]`` int64
    (each sequence's K/V rows ``0..seq_len-1`` in the pool, sequence after sequence), ``cu_seqlens_q / cu_seqlens_k
    [Np + 1]`` int32 prefix sums on the device, and their host twins with ``context_lens``."""

    q_index: torch.Tensor
    key_rows: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_query_len: int
    max_seq_len: int
    cu_seqlens_q_cpu: list[int]
    cu_seqlens_k_cpu: list[int]
    context_lens_cpu: list[int]


@dataclass(frozen=True)
class _PlannedPrefill:
    """Sequences with several query tokens, read by FlashInfer's paged prefill straight from the pool:
    ``q_index [Tp]`` int64 (their rows of ``q``) and the wrapper planned over their blocks."""

    q_index: torch.Tensor
    plan: Any


@dataclass(frozen=True)
class _PagedMetadata:
    """What every layer of one forward needs: ``write_rows [T]`` int64, each new token's row in the pool."""

    write_rows: torch.Tensor
    decode: _DecodeRows | None
    prefill: _PrefillRows | _PlannedPrefill | None


def _pool_rows(block_table: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Row in the pool of token ``positions[i]`` of slot ``slots[i]``: ``[n]`` int64."""
    return block_table[slots, positions // BLOCK_SIZE_TOKENS].long() * BLOCK_SIZE_TOKENS + positions % BLOCK_SIZE_TOKENS


class PagedAttentionBackend(AttentionBackend):
    """Attention over ``PagedKVCache`` (see the module docstring for the kernels used where).

    Decode batches read only device tensors of the batch (``slot_ids``, ``positions``, ``seq_lens``) and the device
    block table, so the CUDA graph runner can capture them. The per-forward metadata (rows, the batch's block tables)
    is ``build_metadata``'s, asked once per forward by the model.

    Args:
        decode_kernel: ``"triton"`` (the paged split-KV kernel), ``"torch"`` (gathered K/V, masked SDPA), or None:
            Triton on a CUDA device in 16-bit, where the product engine uses its Triton kernel; torch elsewhere.

    Prefill rows (``prefill_kernel``, a class attribute): ``"flashinfer"``, FlashInfer's paged prefill (FA3 on
    Hopper) reading the blocks in place, as vLLM and SGLang run it; ``"gather"``, K/V gathered through the table
    into contiguous temporaries for FA2 varlen (or torch off the fast device); None: FlashInfer where it is
    importable and has a kernel for the cache (16-bit CUDA), else gather.
    """

    name = "paged"
    prefill_kernel: str | None = None

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float | None = None,
        *,
        decode_kernel: str | None = None,
    ) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale)
        if decode_kernel not in (None, "triton", "torch"):
            raise ValueError(f"decode_kernel must be None, 'triton' or 'torch', got {decode_kernel!r}")
        if self.prefill_kernel not in (None, "flashinfer", "gather"):
            raise ValueError(f"prefill_kernel must be None, 'flashinfer' or 'gather', got {self.prefill_kernel!r}")
        self.decode_kernel = decode_kernel
        self.prefill_planner = None  # FlashInfer's PagedPrefill, made at the first prefill that uses it
        self._planner_decided = False

    def _planner(self, kv_cache: PagedKVCache):
        """FlashInfer's planner where prefill rows go through it, else None (see ``prefill_kernel``); decided at the
        first prefill."""
        if self.prefill_kernel == "gather" or self._planner_decided:
            return self.prefill_planner
        self._planner_decided = True
        self.prefill_planner = PagedPrefill.for_cache(
            self.num_heads, self.num_kv_heads, self.head_dim, self.scale, kv_cache.k[0]
        )
        if self.prefill_planner is None and self.prefill_kernel == "flashinfer":
            raise ValueError("prefill_kernel 'flashinfer' needs FlashInfer and a 16-bit CUDA cache")
        return self.prefill_planner

    @staticmethod
    def _is_fast_device(x: torch.Tensor) -> bool:
        """Where the product engine runs Triton decode and FA2 prefill: CUDA, 16-bit."""
        return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)

    # ---- per-forward metadata ---------------------------------------------------------------------------------

    def build_metadata(self, batch: ForwardBatch, kv_cache: PagedKVCache) -> _PagedMetadata:
        """The forward's rows and block tables (asked once per forward by the model, as vLLM computes its slot
        mapping once per step)."""
        # An eager forward brings the table up to date itself (PagedExecutor does it before graph replays); a copy
        # must not be captured into a graph.
        if not (batch.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            kv_cache.commit_block_table()
        return self._build_metadata(batch, kv_cache)

    def _build_metadata(self, batch: ForwardBatch, kv_cache: PagedKVCache) -> _PagedMetadata:
        table = kv_cache.block_table
        device = batch.device
        if batch.is_decode_only:
            slots = batch.slot_ids
            decode = _DecodeRows(None, table[slots], batch.seq_lens, batch.max_seq_len)
            return _PagedMetadata(_pool_rows(table, slots, batch.positions), decode, None)

        slot_ids, query_lens = batch.slot_ids_cpu, batch.query_lens_cpu
        seq_lens, cu = batch.seq_lens_cpu, batch.cu_seqlens_q_cpu
        # Host lists, not torch's CPU repeat_interleave (see ForwardBatch.build): the same host work as the product.
        token_slots = torch.tensor(list(chain.from_iterable(map(repeat, slot_ids, query_lens))), dtype=torch.int64)
        write_rows = _pool_rows(table, to_device(token_slots, torch.int64, device), batch.positions)

        # A one-token query (a decode, or a one-token chunk) sees its whole sequence: the decode kernel fits it.
        dec = [i for i, n in enumerate(query_lens) if n == 1]
        pre = [i for i, n in enumerate(query_lens) if n > 1]
        decode = prefill = None
        if dec:
            dec_slots = to_device([slot_ids[i] for i in dec], torch.int64, device)
            decode = _DecodeRows(
                to_device([cu[i] for i in dec], torch.int64, device),
                table[dec_slots],
                to_device([seq_lens[i] for i in dec], torch.int32, device),
                max(seq_lens[i] for i in dec),
            )
        planner = self._planner(kv_cache) if pre else None
        if planner is not None:
            # Each sequence's first ceil(len / 16) blocks, the last holding the rest of its tokens.
            cu_q, kv_indptr, blocks, last_lens = [0], [0], [], []
            for i in pre:
                count = _cdiv(seq_lens[i], BLOCK_SIZE_TOKENS)
                cu_q.append(cu_q[-1] + query_lens[i])
                kv_indptr.append(kv_indptr[-1] + count)
                blocks.extend(kv_cache.slot_block_ids(slot_ids[i])[:count])
                last_lens.append(seq_lens[i] - (count - 1) * BLOCK_SIZE_TOKENS)
            q_index = torch.cat([torch.arange(cu[i], cu[i + 1]) for i in pre])
            plan = planner.plan(cu_q, kv_indptr, blocks, last_lens, BLOCK_SIZE_TOKENS)
            prefill = _PlannedPrefill(to_device(q_index, torch.int64, device), plan)
        elif pre:
            cu_q, cu_k = [0], [0]
            for i in pre:
                cu_q.append(cu_q[-1] + query_lens[i])
                cu_k.append(cu_k[-1] + seq_lens[i])
            q_index = torch.cat([torch.arange(cu[i], cu[i + 1]) for i in pre])
            key_slots = torch.tensor(list(chain.from_iterable(repeat(slot_ids[i], seq_lens[i]) for i in pre)))
            key_pos = torch.tensor(list(chain.from_iterable(range(seq_lens[i]) for i in pre)))
            key_rows = _pool_rows(
                table, to_device(key_slots, torch.int64, device), to_device(key_pos, torch.int64, device)
            )
            prefill = _PrefillRows(
                to_device(q_index, torch.int64, device),
                key_rows,
                to_device(cu_q, torch.int32, device),
                to_device(cu_k, torch.int32, device),
                max(query_lens[i] for i in pre),
                max(seq_lens[i] for i in pre),
                cu_q,
                cu_k,
                [batch.context_lens_cpu[i] for i in pre],
            )
        return _PagedMetadata(write_rows, decode, prefill)

    # ---- the backend interface --------------------------------------------------------------------------------

    def write_kv(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: _PagedMetadata, kv_cache: PagedKVCache
    ) -> None:
        """Stores ``k, v [T, Hkv, D]`` at each token's row found through the block table, with the product's fused
        store kernel on CUDA."""
        store_kv(kv_cache, layer, k, v, meta.write_rows)

    def attend(
        self, layer: int, q: torch.Tensor, batch: ForwardBatch, meta: _PagedMetadata, kv_cache: PagedKVCache
    ) -> torch.Tensor:
        k_rows, v_rows = kv_cache.k_flat[layer], kv_cache.v_flat[layer]
        decode, prefill = meta.decode, meta.prefill
        if prefill is None and decode.q_index is None:
            return self._decode(q, k_rows, v_rows, decode)
        out = torch.empty_like(q)
        if decode is not None:
            out.index_copy_(0, decode.q_index, self._decode(q.index_select(0, decode.q_index), k_rows, v_rows, decode))
        if isinstance(prefill, _PlannedPrefill):
            rows = q.index_select(0, prefill.q_index)
            attended = prefill.plan.run(rows, (kv_cache.k[layer], kv_cache.v[layer]), out=torch.empty_like(rows))
            out.index_copy_(0, prefill.q_index, attended)
        elif prefill is not None:
            out.index_copy_(
                0, prefill.q_index, self._prefill(q.index_select(0, prefill.q_index), k_rows, v_rows, prefill)
            )
        return out

    # ---- kernels ----------------------------------------------------------------------------------------------

    def _decode(self, q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, part: _DecodeRows) -> torch.Tensor:
        """``q [B, H, D]`` (one token per sequence) -> ``[B, H, D]``."""
        use_kernel = self.decode_kernel == "triton" or (self.decode_kernel is None and self._is_fast_device(q))
        if use_kernel:
            from benchmarks.triton_paged_decode import triton_paged_decode_attention

            return triton_paged_decode_attention(
                q,
                k_rows,
                v_rows,
                part.block_tables,
                part.seq_lens,
                self.scale,
                BLOCK_SIZE_TOKENS,
                max_seq_len=part.max_seq_len,
            )
        # Every sequence padded to the batch's bound and masked: no host value per sequence, so capturable.
        batch_size = q.shape[0]
        num_blocks = _cdiv(part.max_seq_len, BLOCK_SIZE_TOKENS)
        offsets = torch.arange(BLOCK_SIZE_TOKENS, device=q.device)
        rows = (part.block_tables[:, :num_blocks].long() * BLOCK_SIZE_TOKENS).unsqueeze(-1) + offsets
        rows = rows.view(batch_size, num_blocks * BLOCK_SIZE_TOKENS)
        positions = torch.arange(rows.shape[1], device=q.device)
        valid = positions.unsqueeze(0) < part.seq_lens.unsqueeze(1)  # [B, L]
        # Rows past a sequence's end hold whatever the pool held (torch.empty: NaNs too), and a masked-out NaN still
        # poisons the products: zero them, as the kernel's masked loads do.
        keep = valid[:, :, None, None]
        keys = torch.where(keep, k_rows[rows], 0.0).transpose(1, 2)  # [B, Hkv, L, D]
        values = torch.where(keep, v_rows[rows], 0.0).transpose(1, 2)
        mask = valid[:, None, None, :]  # [B, 1, 1, L]
        group = self.num_heads // self.num_kv_heads
        # The G query heads of a KV head are G queries of one position (grouped-query attention, no K/V repeat).
        qg = q.reshape(batch_size, self.num_kv_heads, group, self.head_dim)
        out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask, scale=self.scale)
        return out.reshape(batch_size, self.num_heads, self.head_dim)

    def _prefill(self, q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, part: _PrefillRows) -> torch.Tensor:
        """``q [Tp, H, D]`` (the chunks of the prefilling sequences) -> ``[Tp, H, D]``, causal over each sequence's
        context and chunk, read through K/V gathered contiguously (the cost vLLM's paged FA2 does not pay)."""
        keys = k_rows.index_select(0, part.key_rows)  # [Kp, Hkv, D]
        values = v_rows.index_select(0, part.key_rows)
        if self._is_fast_device(q):
            # As engine/attention/torch_flash.py, with K/V now packed: prefix sums instead of slot starts.
            return torch.ops.aten._flash_attention_forward(
                q,
                keys,
                values,
                part.cu_seqlens_q,
                part.cu_seqlens_k,
                part.max_query_len,
                part.max_seq_len,
                0.0,
                True,
                False,
                scale=self.scale,
            )[0]
        out = torch.empty_like(q)
        group = self.num_heads // self.num_kv_heads
        cu_q, cu_k = part.cu_seqlens_q_cpu, part.cu_seqlens_k_cpu
        for i, ctx_len in enumerate(part.context_lens_cpu):
            q_len, seq_len = cu_q[i + 1] - cu_q[i], cu_k[i + 1] - cu_k[i]
            ki = keys[cu_k[i] : cu_k[i + 1]].transpose(0, 1).unsqueeze(0)  # [1, Hkv, seq_len, D]
            vi = values[cu_k[i] : cu_k[i + 1]].transpose(0, 1).unsqueeze(0)
            # As engine/attention/sdpa.py: the G query heads of a KV head folded into the query axis.
            qi = q[cu_q[i] : cu_q[i + 1]].view(q_len, self.num_kv_heads, group, self.head_dim).permute(1, 2, 0, 3)
            qi = qi.reshape(1, self.num_kv_heads, group * q_len, self.head_dim)
            key_pos = torch.arange(seq_len, device=q.device)
            query_pos = torch.arange(ctx_len, seq_len, device=q.device)
            mask = (key_pos.unsqueeze(0) <= query_pos.unsqueeze(1)).repeat(group, 1)  # [G * q_len, seq_len]
            oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=self.scale)
            out[cu_q[i] : cu_q[i + 1]] = (
                oi.view(self.num_kv_heads, group, q_len, self.head_dim)
                .permute(2, 0, 1, 3)
                .reshape(q_len, self.num_heads, self.head_dim)
            )
        return out


class GatherPrefillPagedBackend(PagedAttentionBackend):
    """``PagedAttentionBackend`` whose prefill rows gather K/V for FA2 varlen: the paged mode without FlashInfer."""

    name = "paged_gather"
    prefill_kernel = "gather"


class PagedExecutor(LocalExecutor):
    """``LocalExecutor`` over ``PagedKVCache`` + ``PagedAttentionBackend`` (or ``backend``, a subclass).

    Before each forward it queues the block-table update (a CUDA graph replay runs no backend code that could): the
    scheduler grew the slots for this step on the host while the previous step may still run on the device; that
    step was queued before the copy, so it still reads its own table.
    """

    def __init__(self, config: EngineConfig, backend: type[PagedAttentionBackend] = PagedAttentionBackend) -> None:
        super().__init__(config, kv_cache_factory=PagedKVCache, attention_backend=backend)

    def run(self, seqs, prev_token_ids=None, prev_rows=None) -> torch.Tensor:
        self.kv_cache.commit_block_table()
        return super().run(seqs, prev_token_ids, prev_rows)


def build_paged_engine(config: EngineConfig, prefill_kernel: str | None = None) -> LLMEngine:
    """The engine of ``config`` with a paged KV cache (blocks of 16 tokens) and paged attention: the benchmark's
    vLLM-like baseline. ``cache.page_size_bytes`` and ``cache.prefetch_tokens`` do not apply; the pool gets the bytes
    the vAttention cache would. ``prefill_kernel``: ``"gather"`` for ``GatherPrefillPagedBackend``, else
    ``PagedAttentionBackend``'s choice.

    Raises:
        ValueError: ``tensor_parallel_size`` other than 1 (the paged mode runs on one device).
    """
    if config.model.tensor_parallel_size != 1:
        raise ValueError(
            f"tensor_parallel_size must be 1 for the paged benchmark mode, got {config.model.tensor_parallel_size}"
        )
    if prefill_kernel not in (None, "gather"):
        raise ValueError(f"prefill_kernel must be None or 'gather', got {prefill_kernel!r}")
    backend = GatherPrefillPagedBackend if prefill_kernel == "gather" else PagedAttentionBackend
    return LLMEngine(config, executor_factory=lambda c: PagedExecutor(c, backend))
