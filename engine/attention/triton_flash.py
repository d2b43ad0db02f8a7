"""GPU default where Triton is present: decode through the Triton split-KV kernel, the rest through FA2 varlen.

On the H100 the split-KV kernel read the cache at 94-105% of the device copy bandwidth for batch x context >= 64K
tokens, against 75-91% for FlashAttention-2 varlen, which does not split long sequences across the GPU
(benchmarks/results/attention_h100.json). Prefill and mixed batches keep FA2 varlen, which is faster there.
"""

from __future__ import annotations

from engine.attention.torch_flash import TorchFlashBackend


class TritonFlashBackend(TorchFlashBackend):
    name = "triton_flash"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from engine.attention.triton_decode import triton_decode_attention

        self._decode = triton_decode_attention

    def attend(self, layer, q, batch, kv_cache):
        if not batch.is_decode_only:
            return super().attend(layer, q, batch, kv_cache)
        return self._decode(
            q,
            kv_cache.k_flat[layer],
            kv_cache.v_flat[layer],
            batch.cu_seqlens_k[:-1],
            batch.seq_lens,
            self.scale,
            max_seq_len=batch.max_seq_len,
        )
