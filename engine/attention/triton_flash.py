"""GPU default where Triton is present: decode rows through the Triton split-KV kernel, the rest through FA2 varlen.

On the H100 the split-KV kernel read the cache at 94-105% of the device copy bandwidth for batch x context >= 64K
tokens, against 75-91% for FlashAttention-2 varlen, which does not split long sequences across the GPU
(benchmarks/results/attention_h100.json). Prefill keeps FA2 varlen, which is faster there. A mixed batch (the
scheduler puts running decodes first) sends its leading one-token rows to the decode kernel and the rest to FA2:
in FA2 each one-token row would take a 128-row query tile and read its whole context once per query head.
"""

from __future__ import annotations

import torch

from engine.attention.torch_flash import TorchFlashBackend


class TritonFlashBackend(TorchFlashBackend):
    name = "triton_flash"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from engine.attention.triton_decode import triton_decode_attention

        self._decode = triton_decode_attention

    def attend(self, layer, q, batch, meta, kv_cache):
        k_flat, v_flat = kv_cache.k_flat[layer], kv_cache.v_flat[layer]
        num_decodes = batch.num_leading_decodes
        if num_decodes == batch.num_seqs:
            return self._decode(
                q, k_flat, v_flat, meta.kv_start_rows[:-1], batch.seq_lens, self.scale, max_seq_len=batch.max_seq_len
            )
        if num_decodes == 0:
            return self._prefill(layer, q, batch, meta, kv_cache, 0)
        n = num_decodes  # decode rows are the first n tokens of the flat stream, one each
        out = torch.empty_like(q)
        out[:n] = self._decode(
            q[:n],
            k_flat,
            v_flat,
            meta.kv_start_rows[:n],
            batch.seq_lens[:n],
            self.scale,
            max_seq_len=batch.max_seq_len,
        )
        self._prefill(layer, q[n:], batch, meta, kv_cache, n, out=out[n:])
        return out
