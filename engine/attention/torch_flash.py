"""GPU default: PyTorch's built-in FlashAttention-2 varlen kernel, one launch for the batch.

The kernel takes each sequence's K/V start row in ``cu_seqlens_k`` and its length in
``seqused_k``; pointing the starts at the slots of the flat cache view (``slot * stride``)
lets it read every sequence's K/V in place. Causal masking is bottom-right aligned, which is
what a chunk of new queries over a longer cached context needs.
"""

from __future__ import annotations

import torch

from engine.attention.backend import AttentionBackend


class TorchFlashBackend(AttentionBackend):
    name = "torch_flash"

    def attend(self, layer, q, batch, kv_cache):
        return self._flash(q, kv_cache.k_flat[layer], kv_cache.v_flat[layer], batch.cu_seqlens_q, batch.cu_seqlens_k,
                           batch.seq_lens, batch.max_query_len, batch.max_seq_len)

    def _flash(self, q, k_flat, v_flat, cu_seqlens_q, slot_starts, seq_lens, max_query_len: int, max_seq_len: int):
        """FA2 varlen over ``q [T, H, D]`` (sequences at ``cu_seqlens_q``), keys read in place: sequence ``i`` has
        ``seq_lens[i]`` rows from row ``slot_starts[i]`` of ``k_flat`` / ``v_flat`` (``slot_starts``: ``[N + 1]``)."""
        return torch.ops.aten._flash_attention_forward(
            q.contiguous(), k_flat, v_flat, cu_seqlens_q, slot_starts, max_query_len, max_seq_len,
            0.0,  # dropout_p
            True,  # is_causal
            False,  # return_debug_mask
            scale=self.scale,
            seqused_k=seq_lens,
        )[0]
