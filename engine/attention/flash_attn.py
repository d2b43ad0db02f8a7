"""GPU backend using the ``flash-attn`` package when it is installed.

``flash_attn_with_kvcache`` reads K/V straight from the cache with ``cache_batch_idx`` = slots
and ``cache_seqlens`` = lengths (new rows already written). It needs equal query lengths per
call, so decode tokens go in one call and each prefill chunk in its own.
"""

from __future__ import annotations

import torch

from engine.attention.backend import AttentionBackend


class FlashAttnBackend(AttentionBackend):
    name = "flash_attn"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from flash_attn import flash_attn_with_kvcache  # ImportError names the missing package

        self._fn = flash_attn_with_kvcache

    def _call(self, q, k_cache, v_cache, seq_lens, slots):
        # q [B, q_len, H, D]; seq_lens/slots [B] int32
        return self._fn(
            q, k_cache, v_cache, cache_seqlens=seq_lens, cache_batch_idx=slots, softmax_scale=self.scale, causal=True
        )

    def attend(self, layer, q, batch, meta, kv_cache):
        k_cache, v_cache = kv_cache.k[layer], kv_cache.v[layer]
        seq_lens, slots = batch.seq_lens, batch.slot_ids.to(torch.int32)
        if batch.is_decode_only:
            return self._call(q.unsqueeze(1), k_cache, v_cache, seq_lens, slots).squeeze(1)
        out = torch.empty_like(q)
        decode = [i for i, n in enumerate(batch.query_lens_cpu) if n == 1]
        cu = batch.cu_seqlens_q_cpu
        if decode:
            rows = torch.tensor([cu[i] for i in decode], device=q.device)
            idx = torch.tensor(decode, device=q.device)
            out[rows] = self._call(q[rows].unsqueeze(1), k_cache, v_cache, seq_lens[idx], slots[idx]).squeeze(1)
        for i, n in enumerate(batch.query_lens_cpu):
            if n > 1:
                out[cu[i] : cu[i + 1]] = self._call(
                    q[cu[i] : cu[i + 1]].unsqueeze(0), k_cache, v_cache, seq_lens[i : i + 1], slots[i : i + 1]
                ).squeeze(0)
        return out
