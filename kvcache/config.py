"""Configuration of the vAttention KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LAYOUTS = ("layer_major", "token_major")
# Share of the memory free at start-up that the page pool takes when no size is given.
DEFAULT_KV_CACHE_MEMORY_FRACTION = 0.9
# Most batch slots a cache sizes itself to when none are given: vLLM's ceiling on sequences per step on an H100.
MAX_AUTO_BATCH_SLOTS = 1024


def batch_slots_for_pool(pool_pages: int, pages_per_request: int) -> int:
    """Batch slots for a pool of ``pool_pages`` when none are given: one for each request the pool can hold at its
    smallest (``pages_per_request``: a page in each buffer), at most ``MAX_AUTO_BATCH_SLOTS``. A slot costs only
    virtual address space until a request maps pages into it, so the pool, not the slot count, limits the batch."""
    return max(1, min(MAX_AUTO_BATCH_SLOTS, pool_pages // pages_per_request))


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Accepts a torch dtype or its name ("bfloat16", "float16", "float32")."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype}")
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[name]


@dataclass
class KVCacheConfig:
    """Shape and memory budget of one rank's KV cache.

    Attributes:
        num_layers: decoder layers; each has one K and one V virtual tensor.
        num_kv_heads: KV heads held by this rank (``total_kv_heads / tp`` under tensor parallelism).
        head_dim: elements per head.
        max_batch_size: batch slots, i.e. requests that can hold KV at once; ``None`` = sized from the page pool
            (``batch_slots_for_pool``: as many requests as it holds at a page per buffer, at most 1024).
        max_seq_len: tokens one slot can hold.
        dtype: element type of K and V.
        device: "cpu" (host mmap backend) or "cuda[:N]" (CUDA driver virtual memory).
        page_size_bytes: physical page size; a multiple of the backend's granularity
            (default: the granularity, 64 KiB on the host and 2 MiB on CUDA).
        kv_cache_memory_bytes: physical memory for the page pool, created up front.
        kv_cache_memory_fraction: alternatively, this fraction of the memory free at start-up.
            With neither set, the pool is sized to back the whole virtual cache, capped at
            ``DEFAULT_KV_CACHE_MEMORY_FRACTION`` (0.9) of free memory.
        kv_cache_layout: how the K/V bytes are laid out in virtual memory, i.e. what one physical page holds.
            ``"layer_major"``: one virtual buffer per layer's K and per layer's V, each slot's tokens contiguous in
            it (the per-layer tensors are dense); a page holds ``page / (H * D * itemsize)`` tokens of one buffer
            (1024 for Llama-3-8B on 2 MiB pages), so a request holds up to a page of unused KV per buffer.
            ``"token_major"``: one virtual buffer, every layer's K and V of a token side by side; a page holds
            ``page / (2 * L * H * D * itemsize)`` tokens of all layers (16 for Llama-3-8B), so a request holds at
            most one page beyond its tokens; the per-layer views are strided (row stride ``2 * L * H * D``).
            Either way a request's KV is one virtually contiguous range per buffer and kernels see no block table.
        prefetch_tokens: tokens mapped eagerly beyond what the next iteration needs, so that a slot's next page
            is mapped steps before its first token is written there.
        prefetch_pages_per_step: most pages one ``map_ahead`` call maps beyond the next iteration's need
            (``None``: no limit). Requests decoding in lockstep all cross a page boundary at the same step; the
            limit spreads their mapping over the steps before it instead of stalling that one step.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_batch_size: int | None
    max_seq_len: int
    dtype: torch.dtype | str = torch.float32
    device: str = "cpu"
    page_size_bytes: int | None = None
    kv_cache_memory_bytes: int | None = None
    kv_cache_memory_fraction: float | None = None
    kv_cache_layout: str = "layer_major"
    prefetch_tokens: int = 0
    prefetch_pages_per_step: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "max_batch_size", "max_seq_len"):
            value = getattr(self, name)
            if value is None and name == "max_batch_size":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.dtype = parse_dtype(self.dtype)
        try:
            device = torch.device(self.device)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.page_size_bytes is not None and (self.page_size_bytes < 4096 or self.page_size_bytes % 4096):
            raise ValueError(f"page_size_bytes must be a positive multiple of 4096, got {self.page_size_bytes}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_fraction is not None:
            raise ValueError("set at most one of kv_cache_memory_bytes and kv_cache_memory_fraction")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise ValueError(f"kv_cache_memory_bytes must be >= 1, got {self.kv_cache_memory_bytes}")
        if self.kv_cache_memory_fraction is not None and not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}")
        if self.kv_cache_layout not in LAYOUTS:
            raise ValueError(f"kv_cache_layout must be one of {LAYOUTS}, got {self.kv_cache_layout!r}")
        if self.prefetch_tokens < 0:
            raise ValueError(f"prefetch_tokens must be >= 0, got {self.prefetch_tokens}")
        if self.prefetch_pages_per_step is not None and self.prefetch_pages_per_step < 0:
            raise ValueError(f"prefetch_pages_per_step must be None or >= 0, got {self.prefetch_pages_per_step}")

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's K (or V) in one layer on this rank."""
        return self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def num_buffers(self) -> int:
        """Virtual buffers, each mapped page by page: every layer's K and V, or one for all (token-major)."""
        return 2 * self.num_layers if self.kv_cache_layout == "layer_major" else 1

    @property
    def buffer_token_bytes(self) -> int:
        """Bytes one token takes in one buffer."""
        return self.token_bytes * 2 * self.num_layers // self.num_buffers
