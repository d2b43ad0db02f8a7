"""Attention backends against a naive reference, reading and writing a real VirtualKVCache."""

import importlib.util

import pytest
import torch

from engine.attention import get_attention_backend
from engine.batch import ForwardBatch
from kvcache import KVCacheConfig, VirtualKVCache

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 8, 2, 64
# (context_len, query_len) per sequence: decode, fresh prefill, chunked prefill, long decode, 1-token prompt
SEQS = [(5, 1), (0, 17), (23, 9), (130, 1), (0, 1)]


def reference_attention(q, k, v, context_len):
    """q [q_len, H, D]; k, v [seq_len, H_kv, D] (context + new); causal from position context_len."""
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * HEAD_DIM**-0.5
    q_pos = torch.arange(context_len, context_len + q.shape[0]).unsqueeze(1)
    k_pos = torch.arange(k.shape[0]).unsqueeze(0)
    scores = scores.masked_fill((k_pos > q_pos).to(scores.device), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


DECODE_SEQS = [(5, 1), (130, 1), (0, 1), (200, 1), (77, 1)]
# The scheduler's order: running decodes first, then prefill chunks and new prompts.
DECODES_FIRST_SEQS = [(5, 1), (130, 1), (40, 1), (0, 17), (23, 9), (0, 1)]
LAYOUTS = ["layer_major", "token_major"]


def run_backend(name, device, dtype, slot_order, seqs=SEQS, layout="layer_major"):
    cache = VirtualKVCache(
        KVCacheConfig(
            num_layers=2,
            num_kv_heads=NUM_KV_HEADS,
            head_dim=HEAD_DIM,
            max_batch_size=len(seqs) + 1,
            max_seq_len=256,
            dtype=dtype,
            device=device,
            kv_cache_memory_bytes=64 << 20,
            kv_cache_layout=layout,
        )
    )
    try:
        backend = get_attention_backend(name, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM)
        g = torch.Generator().manual_seed(0)
        slots = [cache.allocate(c + n) for c, n in seqs]
        slots = [slots[i] for i in slot_order]
        full_k, full_v, items, queries = [], [], [], []
        layer = 1
        for slot, (ctx, n) in zip(slots, seqs):
            k = torch.randn(ctx + n, NUM_KV_HEADS, HEAD_DIM, generator=g).to(device, dtype)
            v = torch.randn(ctx + n, NUM_KV_HEADS, HEAD_DIM, generator=g).to(device, dtype)
            cache.k[layer][slot, :ctx] = k[:ctx]  # context written by earlier steps
            cache.v[layer][slot, :ctx] = v[:ctx]
            full_k.append(k)
            full_v.append(v)
            queries.append(torch.randn(n, NUM_HEADS, HEAD_DIM, generator=g).to(device, dtype))
            items.append((slot, list(range(n)), ctx))
        batch = ForwardBatch.build(items, device)
        q = torch.cat(queries)
        k_new = torch.cat([k[ctx:] for k, (ctx, _) in zip(full_k, seqs)])
        v_new = torch.cat([v[ctx:] for v, (ctx, _) in zip(full_v, seqs)])
        out = backend.forward(layer, q, k_new, v_new, batch, backend.build_metadata(batch, cache), cache)
        assert out.shape == q.shape
        cu = batch.cu_seqlens_q_cpu
        for i, (slot, (ctx, n)) in enumerate(zip(slots, seqs)):
            # new K/V landed in the slot, in place
            assert torch.equal(cache.k[layer][slot, : ctx + n], full_k[i])
            assert torch.equal(cache.v[layer][slot, : ctx + n], full_v[i])
            ref = reference_attention(queries[i], full_k[i], full_v[i], ctx)
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(out[cu[i] : cu[i + 1]].float(), ref, atol=tol, rtol=tol)
    finally:
        cache.close()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("slot_order", [[0, 1, 2, 3, 4], [4, 2, 0, 3, 1]])
def test_sdpa_mixed_batch_cpu(slot_order, layout):
    run_backend("sdpa", "cpu", torch.float32, slot_order, layout=layout)


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="attention_backend"):
        get_attention_backend("paged", NUM_HEADS, NUM_KV_HEADS, HEAD_DIM)


def optional(name):
    """The backend ``name`` as a test parameter, skipped where its package is not installed."""
    missing = importlib.util.find_spec(name) is None
    return pytest.param(name, marks=pytest.mark.skipif(missing, reason=f"{name} not installed"))


@pytest.mark.skipif(importlib.util.find_spec("flashinfer") is not None, reason="flashinfer installed")
def test_flashinfer_backend_without_the_package_names_it():
    with pytest.raises(ImportError, match="flashinfer"):
        get_attention_backend("flashinfer", NUM_HEADS, NUM_KV_HEADS, HEAD_DIM)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "name", ["sdpa", "torch_flash", "triton_flash", optional("flashinfer"), optional("flash_attn")]
)
@pytest.mark.parametrize("slot_order", [[0, 1, 2, 3, 4], [4, 2, 0, 3, 1]])
def test_backends_mixed_batch_gpu(name, slot_order, layout):
    run_backend(name, "cuda", torch.bfloat16, slot_order, layout=layout)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["torch_flash", "triton_flash", optional("flashinfer")])
def test_backends_decode_only_batch_gpu(name, layout):
    run_backend(name, "cuda", torch.bfloat16, [3, 1, 4, 0, 2], seqs=DECODE_SEQS, layout=layout)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", ["torch_flash", "triton_flash", optional("flashinfer")])
def test_backends_decodes_first_mixed_batch_gpu(name, layout):
    """The scheduler's order: running decodes first, then prefill chunks and new prompts."""
    run_backend(name, "cuda", torch.bfloat16, [5, 2, 0, 4, 1, 3], seqs=DECODES_FIRST_SEQS, layout=layout)
