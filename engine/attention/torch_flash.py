"""GPU default: PyTorch's built-in FlashAttention-2 varlen kernel, one launch for the batch.

The kernel takes each sequence's K/V start row in its ``cu_seqlens_k`` argument and its length in
``seqused_k``; passing the forward's ``SlotRows.kv_start_rows`` (the slots' starts in the flat cache view,
``slot * stride``, not a prefix sum) there lets it read every sequence's K/V in place. Causal masking is bottom-right aligned, which is
what a chunk of new queries over a longer cached context needs.
"""

from __future__ import annotations

import torch

from engine.attention.backend import AttentionBackend


class TorchFlashBackend(AttentionBackend):
    name = "torch_flash"

    def attend(self, layer, q, batch, meta, kv_cache):
        return self._prefill(layer, q, batch, meta, kv_cache, 0)

    def _prefill(self, layer, q, batch, meta, kv_cache, first, out=None):
        """Attention of the batch's sequences ``first..`` (``q`` holds only their rows; every sequence before
        ``first`` has one row), into ``out`` when given; returns the output."""
        cu_seqlens_q = batch.cu_seqlens_q if first == 0 else batch.cu_seqlens_q[first:] - first
        result = self._varlen(
            q,
            kv_cache.k_flat[layer],
            kv_cache.v_flat[layer],
            cu_seqlens_q,
            meta.kv_start_rows[first:],
            batch.seq_lens[first:],
            batch.max_query_len,
            batch.max_seq_len,
        )
        if out is None:
            return result
        out.copy_(result)
        return out

    def _varlen(self, q, k_flat, v_flat, cu_seqlens_q, slot_starts, seq_lens, max_query_len, max_seq_len):
        """FA2 varlen over the cache: ``q [T, H, D]`` with offsets ``cu_seqlens_q [N+1]``; sequence ``i``'s K/V are
        rows ``slot_starts[i] ..`` (``[N+1]``, the last entry unused) of ``k_flat``, ``seq_lens[i]`` of them."""
        return torch.ops.aten._flash_attention_forward(
            q.contiguous(),
            k_flat,
            v_flat,
            cu_seqlens_q,
            slot_starts,
            max_query_len,
            max_seq_len,
            0.0,  # dropout_p
            True,  # is_causal
            False,  # return_debug_mask
            scale=self.scale,
            seqused_k=seq_lens,
        )[0]
