"""CPU (and fallback) backend: PyTorch scaled_dot_product_attention, one call per sequence.

Each sequence's K/V is a contiguous, dense view of its slot (``kv_cache.k[layer][slot, :len]``),
so no gather is needed; the loop over sequences is the price of unequal lengths (padding to
the longest would read unmapped rows, which faults).

Grouped-query attention without repeating K/V: the ``G = H / H_kv`` query heads sharing a KV
head are folded into the query-length axis, ``[1, H_kv, G * q_len, D]``. With 4-D inputs and
no ``enable_gqa`` PyTorch picks its fused CPU flash kernel; ``enable_gqa`` or 3-D inputs fall
back to the unfused math path, measured 5-8x slower for decode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.backend import AttentionBackend


class SDPABackend(AttentionBackend):
    name = "sdpa"
    supports_cuda_graphs = False  # loops over the batch's host lists: a graph would replay the captured ones

    def attend(self, layer, q, batch, meta, kv_cache):
        out = torch.empty_like(q)
        k_cache, v_cache = kv_cache.k[layer], kv_cache.v[layer]
        num_kv_heads, head_dim = self.num_kv_heads, self.head_dim
        group = self.num_heads // num_kv_heads
        cu = batch.cu_seqlens_q_cpu
        for i, slot in enumerate(batch.slot_ids_cpu):
            start, end = cu[i], cu[i + 1]
            q_len, ctx_len, seq_len = end - start, batch.context_lens_cpu[i], batch.seq_lens_cpu[i]
            ki = k_cache[slot, :seq_len].transpose(0, 1).unsqueeze(0)  # [1, H_kv, seq_len, D], a view
            vi = v_cache[slot, :seq_len].transpose(0, 1).unsqueeze(0)
            if q_len == 1:
                # decode: the G query heads of a KV head are G queries at the same position, no mask
                qi = q[start].view(1, num_kv_heads, group, head_dim)
                oi = F.scaled_dot_product_attention(qi, ki, vi, scale=self.scale)
                out[start] = oi.reshape(self.num_heads, head_dim)  # the GPU kernel may return it strided
                continue
            qi = q[start:end].view(q_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
            qi = qi.reshape(1, num_kv_heads, group * q_len, head_dim)
            # new query j sits at position ctx_len + j and sees keys 0..ctx_len + j
            key_pos = torch.arange(seq_len, device=q.device)
            query_pos = torch.arange(ctx_len, seq_len, device=q.device)
            mask = (key_pos.unsqueeze(0) <= query_pos.unsqueeze(1)).repeat(group, 1)  # [G * q_len, seq_len]
            oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=self.scale)
            out[start:end] = (
                oi.view(num_kv_heads, group, q_len, head_dim)
                .permute(2, 0, 1, 3)
                .reshape(q_len, self.num_heads, head_dim)
            )
        return out
