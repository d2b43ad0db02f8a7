"""The attention-backend interface and its factory."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from engine.batch import to_device
from engine.layers.triton_dispatch import use_triton

if TYPE_CHECKING:
    from engine.batch import ForwardBatch
    from kvcache import KVCache


@dataclass(frozen=True)
class SlotRows:
    """Where a forward's sequences live in the vAttention cache: slot ``s`` owns rows
    ``s * slot_stride_tokens + [0, max_seq_len)`` of every layer's ``k_flat`` / ``v_flat``.

    Attributes:
        slot_mapping: ``[T]`` int64, the row of each new token (``slot * slot_stride_tokens + position``), where its
            K/V are written.
        kv_start_rows: ``[N+1]`` int32, ``slot_ids * slot_stride_tokens`` then a final ``0``: the first row of each
            sequence's KV; FA2 varlen takes it as ``cu_seqlens_k`` with ``seqused_k`` (it is not a prefix sum).
    """

    slot_mapping: torch.Tensor
    kv_start_rows: torch.Tensor


def slot_rows(batch: ForwardBatch, slot_stride_tokens: int) -> SlotRows:
    """``SlotRows`` of ``batch`` in a cache whose slots are ``slot_stride_tokens`` rows apart.

    A decode batch (one token per sequence) is computed on the device from its device tensors alone, so a CUDA graph
    captures it and each replay recomputes it from the step's slots and positions; any other batch from its host
    lists, copied over without waiting for the device.

    Raises:
        ValueError: a batch with chunks of several tokens and no host positions (only a CUDA graph's static batch
            lacks them, and it is a decode batch).
    """
    if slot_stride_tokens < 1:
        raise ValueError(f"slot_stride_tokens must be >= 1, got {slot_stride_tokens}")
    if batch.is_decode_only:
        starts = batch.slot_ids * slot_stride_tokens
        zero = torch.zeros(1, dtype=starts.dtype, device=starts.device)
        return SlotRows(starts + batch.positions, torch.cat([starts, zero]).to(torch.int32))
    if batch.positions_cpu is None:
        raise ValueError("a batch of multi-token chunks needs its host positions (positions_cpu)")
    # A range of rows per sequence, extended in C (not torch's CPU repeat_interleave: see ForwardBatch.build).
    rows: list[int] = []
    for slot, context, q_len in zip(batch.slot_ids_cpu, batch.context_lens_cpu, batch.query_lens_cpu):
        first = slot * slot_stride_tokens + context
        rows.extend(range(first, first + q_len))
    mapping = torch.tensor(rows, dtype=torch.int64)
    kv_start_rows = torch.tensor([s * slot_stride_tokens for s in batch.slot_ids_cpu] + [0], dtype=torch.int64)
    return SlotRows(to_device(mapping, torch.int64, batch.device), to_device(kv_start_rows, torch.int32, batch.device))


class AttentionBackend(ABC):
    """Writes a layer's new K/V rows into the cache and attends over the cache.

    Per forward the model asks ``build_metadata`` once (where each sequence's KV lives: here the vAttention cache's
    slot rows; a paged backend its block tables) and hands it to every layer's ``forward``.

    Causality: the query at position ``p`` of a sequence sees that sequence's keys ``0..p``
    (its cached context plus the new tokens up to itself), whatever mix of prefill chunks and
    decode tokens the batch holds.
    """

    name: str = "abstract"
    # Decode reads every per-sequence value from the batch's device tensors (not its host lists), so a captured
    # CUDA graph replays correctly for new lengths and slots.
    supports_cuda_graphs: bool = True

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale if scale is not None else head_dim**-0.5

    def build_metadata(self, batch: ForwardBatch, kv_cache: KVCache) -> Any:
        """What every layer of this forward needs to find the batch's KV in ``kv_cache``: ``SlotRows``."""
        return slot_rows(batch, kv_cache.slot_stride_tokens)

    def compile_kernels(self, kv_cache: KVCache) -> None:
        """Builds what the backend compiles on first use (the model runner asks once the cache exists, so that no
        request's step waits for a compiler); nothing for backends whose kernels are built ahead."""
        return None

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: Any, kv_cache: KVCache) -> None:
        """Store ``k, v [T, H_kv, D]`` at rows ``meta.slot_mapping`` of layer ``layer``'s cache.
        The rows must be mapped (the engine grows slots before the forward). On CUDA one fused launch writes
        both (``triton_ops.store_kv``), elsewhere two ``index_copy_``."""
        store_kv(kv_cache, layer, k, v, meta.slot_mapping)

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: ForwardBatch,
        meta: Any,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        """``q [T, H, D]``, new ``k, v [T, H_kv, D]`` -> attention output ``[T, H, D]``; ``meta`` is this forward's
        ``build_metadata``."""
        self.write_kv(layer, k, v, meta, kv_cache)
        return self.attend(layer, q, batch, meta, kv_cache)

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, batch: ForwardBatch, meta: Any, kv_cache: KVCache) -> torch.Tensor:
        """Attention of ``q [T, H, D]`` over each sequence's first ``seq_lens[i]`` cache rows
        (new K/V already written) -> ``[T, H, D]``."""


def store_kv(kv_cache: Any, layer: int, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor) -> None:
    """``k_flat[layer][rows] = k`` and the same for v: one fused launch on CUDA, two ``index_copy_`` elsewhere."""
    if use_triton(k):
        from engine.layers import triton_ops

        triton_ops.store_kv(k, v, kv_cache.k_flat[layer], kv_cache.v_flat[layer], rows)
        return
    kv_cache.k_flat[layer].index_copy_(0, rows, k)
    kv_cache.v_flat[layer].index_copy_(0, rows, v)


def get_attention_backend(
    name: str, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None
) -> AttentionBackend:
    """Instantiate the backend called ``name`` (``sdpa``, ``torch_flash``, ``triton_flash``, ``flashinfer`` or
    ``flash_attn``).

    Raises:
        ValueError: unknown name.
        ImportError: ``flash_attn`` or ``flashinfer`` asked for but not importable.
    """
    if name == "sdpa":
        from engine.attention.sdpa import SDPABackend as cls
    elif name == "torch_flash":
        from engine.attention.torch_flash import TorchFlashBackend as cls
    elif name == "triton_flash":
        from engine.attention.triton_flash import TritonFlashBackend as cls
    elif name == "flashinfer":
        from engine.attention.flashinfer import FlashInferBackend as cls
    elif name == "flash_attn":
        from engine.attention.flash_attn import FlashAttnBackend as cls
    else:
        raise ValueError(
            "attention_backend must be 'sdpa', 'torch_flash', 'triton_flash', 'flashinfer' or 'flash_attn', "
            f"got {name!r}"
        )
    return cls(num_heads, num_kv_heads, head_dim, scale)
