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
        out = torch.ops.aten._flash_attention_forward(
            q.contiguous(),
            kv_cache.k_flat[layer],
            kv_cache.v_flat[layer],
            batch.cu_seqlens_q,
            batch.cu_seqlens_k,
            batch.max_query_len,
            batch.max_seq_len,
            0.0,  # dropout_p
            True,  # is_causal
            False,  # return_debug_mask
            scale=self.scale,
            seqused_k=batch.seq_lens,
        )[0]
        return out
