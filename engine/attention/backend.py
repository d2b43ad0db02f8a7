"""The attention-backend interface and its factory."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from engine.layers.triton_dispatch import use_triton

if TYPE_CHECKING:
    from engine.batch import ForwardBatch
    from kvcache import KVCache


class AttentionBackend(ABC):
    """Writes a layer's new K/V rows into the virtual cache and attends over the cache.

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

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch, kv_cache: KVCache) -> None:
        """Store ``k, v [T, H_kv, D]`` at rows ``batch.slot_mapping`` of layer ``layer``'s cache.
        The rows must be mapped (the engine grows slots before the forward). On CUDA one fused launch writes
        both (``triton_ops.store_kv``), elsewhere two ``index_copy_``."""
        if use_triton(k):
            from engine.layers import triton_ops

            triton_ops.store_kv(k, v, kv_cache.k_flat[layer], kv_cache.v_flat[layer], batch.slot_mapping)
            return
        kv_cache.k_flat[layer].index_copy_(0, batch.slot_mapping, k)
        kv_cache.v_flat[layer].index_copy_(0, batch.slot_mapping, v)

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: ForwardBatch,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        """``q [T, H, D]``, new ``k, v [T, H_kv, D]`` -> attention output ``[T, H, D]``."""
        self.write_kv(layer, k, v, batch, kv_cache)
        return self.attend(layer, q, batch, kv_cache)

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, batch: ForwardBatch, kv_cache: KVCache) -> torch.Tensor:
        """Attention of ``q [T, H, D]`` over each sequence's first ``seq_lens[i]`` cache rows
        (new K/V already written) -> ``[T, H, D]``."""


def get_attention_backend(
    name: str, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None
) -> AttentionBackend:
    """Instantiate the backend called ``name`` (``sdpa``, ``torch_flash``, ``triton_flash`` or ``flash_attn``).

    Raises:
        ValueError: unknown name.
        ImportError: ``flash_attn`` asked for but not importable.
    """
    if name == "sdpa":
        from engine.attention.sdpa import SDPABackend as cls
    elif name == "torch_flash":
        from engine.attention.torch_flash import TorchFlashBackend as cls
    elif name == "triton_flash":
        from engine.attention.triton_flash import TritonFlashBackend as cls
    elif name == "flash_attn":
        from engine.attention.flash_attn import FlashAttnBackend as cls
    else:
        raise ValueError(
            f"attention_backend must be 'sdpa', 'torch_flash', 'triton_flash' or 'flash_attn', got {name!r}"
        )
    return cls(num_heads, num_kv_heads, head_dim, scale)
