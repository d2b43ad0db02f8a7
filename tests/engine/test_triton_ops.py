"""The fused Triton layer kernels (engine/layers/triton_ops.py) against the torch code paths of the layers.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (see ``triton_interpreter``); the ``gpu``
tests run the compiled kernels, through the layers' own CUDA dispatch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

# Sets TRITON_INTERPRET on CPU machines: imported before anything that imports triton.
from tests.engine.triton_interpreter import devices, triton_interpreter

# isort: split
import triton.language as tl  # noqa: E402

from engine.layers import RMSNorm, SiluAndMul, apply_rotary, triton_ops  # noqa: E402
from engine.layers.triton_dispatch import use_triton  # noqa: E402
from kvcache import KVCacheConfig, VirtualKVCache  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _interpreter_rounds_bf16_to_nearest_even():
    """Triton 3.6's interpreter casts float32 -> bfloat16 by truncating the mantissa, where the GPU (and torch) round
    to nearest even; without this every bf16 result would look one ulp off. Use torch's cast instead."""
    original = triton_interpreter._convert_float

    def rounded(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
            as_bf16 = torch.from_numpy(np.ascontiguousarray(input).view(np.float32)).to(torch.bfloat16)
            return as_bf16.view(torch.int16).numpy().view(np.uint16).reshape(input.shape)
        return original(input, input_dtype, output_dtype, rounding_mode)

    triton_interpreter._convert_float = rounded
    yield
    triton_interpreter._convert_float = original


def _devices():
    return devices(triton_ops._rms_norm_kernel)


def _randn(*shape, device, dtype, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)


def _assert_bf16_matches(actual, expected, max_mismatch_fraction=1e-3):
    """Bit for bit under the interpreter (numpy's float32 sum and exp agree with torch's on CPU); on the GPU equal
    except for rare elements one bf16 ulp apart (reduction order, Triton's approximate exp)."""
    if not actual.is_cuda:
        assert torch.equal(actual, expected), f"{int((actual != expected).sum())} of {actual.numel()} differ"
        return
    actual, expected = actual.float().cpu(), expected.float().cpu()
    differ = actual != expected
    assert differ.float().mean().item() <= max_mismatch_fraction, f"{int(differ.sum())} of {differ.numel()} differ"
    ulp = torch.finfo(torch.bfloat16).eps * expected.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    assert ((actual - expected).abs() <= ulp * 1.01).all()


def _norm_reference(norm: RMSNorm, x, residual=None):
    """The layer's torch path, whatever device the tensors are on (the CUDA forward would take the kernel)."""
    if residual is None:
        return norm._norm(x)
    s = x + residual
    return norm._norm(s), s


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens,hidden", [(1, 576), (37, 576), (3, 4096)])
def test_rms_norm_matches_the_torch_layer(device, dtype, num_tokens, hidden):
    norm = RMSNorm(hidden, eps=1e-5).to(device, dtype)
    with torch.no_grad():
        norm.weight.copy_(_randn(hidden, device=device, dtype=dtype, seed=1, scale=0.3) + 1)
    x = _randn(num_tokens, hidden, device=device, dtype=dtype, seed=2, scale=3.0)
    residual = _randn(num_tokens, hidden, device=device, dtype=dtype, seed=3)

    out = triton_ops.rms_norm(x, norm.weight, norm.eps)
    fused_out, fused_sum = triton_ops.fused_add_rms_norm(x, residual, norm.weight, norm.eps)
    ref = _norm_reference(norm, x)
    ref_out, ref_sum = _norm_reference(norm, x, residual)

    assert out.dtype == fused_out.dtype == fused_sum.dtype == dtype
    assert torch.equal(fused_sum, ref_sum)  # one rounded add, bit for bit
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fused_out, ref_out, atol=1e-5, rtol=1e-5)
    else:
        _assert_bf16_matches(out, ref)
        _assert_bf16_matches(fused_out, ref_out)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens,d", [(1, 96), (37, 1536), (3, 4100)])
def test_silu_and_mul_matches_the_torch_layer(device, dtype, num_tokens, d):
    x = _randn(num_tokens, 2 * d, device=device, dtype=dtype, seed=4, scale=4.0)
    out = triton_ops.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    ref = torch.nn.functional.silu(gate) * up  # SiluAndMul's torch path
    assert out.shape == (num_tokens, d) and out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    else:
        _assert_bf16_matches(out, ref)


def _rotary_case(device, dtype, num_tokens, num_heads, num_kv_heads, head_dim, seed):
    """q, k as strided views of one fused qkv output, like LlamaAttention's; cos/sin from real positions."""
    qkv = _randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device=device, dtype=dtype, seed=seed)
    q, k, _ = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    positions = torch.randint(0, 4000, (num_tokens,), generator=torch.Generator().manual_seed(seed))
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None]
    return (
        qkv,
        q.view(num_tokens, num_heads, head_dim),
        k.view(num_tokens, num_kv_heads, head_dim),
        freqs.cos().to(device),
        freqs.sin().to(device),
    )


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens,num_heads,num_kv_heads,head_dim", [(3, 9, 3, 64), (37, 32, 8, 128), (1, 4, 4, 64)])
def test_rotary_qk_in_place_on_strided_views_matches_apply_rotary(
    device, dtype, num_tokens, num_heads, num_kv_heads, head_dim
):
    qkv, q, k, cos, sin = _rotary_case(device, dtype, num_tokens, num_heads, num_kv_heads, head_dim, seed=5)
    v_before = qkv[:, (num_heads + num_kv_heads) * head_dim :].clone()
    # Reference rotation computed in float32 (what the kernel claims) and the layer's own path (in dtype).
    exact_q = apply_rotary(q.float(), cos.float(), sin.float())
    exact_k = apply_rotary(k.float(), cos.float(), sin.float())
    layer_q, layer_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    triton_ops.apply_rotary_qk_(q, k, cos, sin)

    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim :], v_before)  # v untouched
    if dtype == torch.float32:
        torch.testing.assert_close(q, layer_q, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(k, layer_k, atol=1e-5, rtol=1e-5)
    else:
        # Rounded once: the float32 rotation rounded to bf16 (on the GPU, FMA contraction may move an element by
        # one ulp) ...
        if device == "cpu":
            assert torch.equal(q, exact_q.to(dtype)) and torch.equal(k, exact_k.to(dtype))
        else:
            torch.testing.assert_close(q.float(), exact_q.to(dtype).float(), atol=1e-6, rtol=8e-3)
            torch.testing.assert_close(k.float(), exact_k.to(dtype).float(), atol=1e-6, rtol=8e-3)
        # ... and within a few bf16 ulps of the torch path, which rounds after every op.
        torch.testing.assert_close(q.float(), layer_q.float(), atol=4e-2, rtol=2e-2)
        torch.testing.assert_close(k.float(), layer_k.float(), atol=4e-2, rtol=2e-2)


@pytest.mark.parametrize("device", _devices())
def test_store_kv_writes_strided_k_v_into_a_virtual_kv_cache(device):
    """Into the real cache (host mmap or CUDA VMM): exactly the rows of slot_mapping, other rows untouched."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    num_kv_heads, head_dim, num_heads = 3, 64, 9
    config = KVCacheConfig(
        num_layers=2,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        max_batch_size=4,
        max_seq_len=256,
        dtype=dtype,
        device=device,
        kv_cache_memory_bytes=32 << 20,
    )
    cache = VirtualKVCache(config)
    try:
        lens = [40, 7, 100]
        slots = [cache.allocate(n) for n in lens]
        layer = 1
        for slot, n in zip(slots, lens):
            cache.k[layer][slot, :n] = _randn(n, num_kv_heads, head_dim, device=device, dtype=dtype, seed=slot)
            cache.v[layer][slot, :n] = _randn(n, num_kv_heads, head_dim, device=device, dtype=dtype, seed=slot + 9)
        before_k = [cache.k[layer][slot, :n].clone() for slot, n in zip(slots, lens)]
        before_v = [cache.v[layer][slot, :n].clone() for slot, n in zip(slots, lens)]
        other_layer = cache.k[0][slots[0], : lens[0]].clone()

        # A prefill chunk of 3 tokens (rows 10..12 of slot 0) and decode tokens at the ends of slots 1 and 2.
        targets = [(0, 10), (0, 11), (0, 12), (1, 6), (2, 99)]
        stride = cache.slot_stride_tokens
        slot_mapping = torch.tensor([slots[i] * stride + pos for i, pos in targets], dtype=torch.int64, device=device)
        qkv = _randn(len(targets), (num_heads + 2 * num_kv_heads) * head_dim, device=device, dtype=dtype, seed=7)
        _, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
        k = k.view(-1, num_kv_heads, head_dim)
        v = v.view(-1, num_kv_heads, head_dim)

        triton_ops.store_kv(k, v, cache.k_flat[layer], cache.v_flat[layer], slot_mapping)

        for t, (i, pos) in enumerate(targets):
            before_k[i][pos] = k[t]
            before_v[i][pos] = v[t]
        for i, (slot, n) in enumerate(zip(slots, lens)):
            assert torch.equal(cache.k[layer][slot, :n], before_k[i])
            assert torch.equal(cache.v[layer][slot, :n], before_v[i])
        assert torch.equal(cache.k[0][slots[0], : lens[0]], other_layer)
    finally:
        cache.close()


@pytest.mark.parametrize("device", _devices())
def test_wrappers_reject_mismatched_inputs(device):
    x = torch.zeros(2, 8, device=device)
    with pytest.raises(ValueError, match="weight.dtype"):
        triton_ops.rms_norm(x, torch.ones(8, dtype=torch.float64, device=device), 1e-6)
    with pytest.raises(ValueError, match="weight must be"):
        triton_ops.rms_norm(x, torch.ones(6, device=device), 1e-6)
    with pytest.raises(ValueError, match="residual must match"):
        triton_ops.fused_add_rms_norm(x, torch.zeros(2, 6, device=device), torch.ones(8, device=device), 1e-6)
    with pytest.raises(ValueError, match="2 \\* d"):
        triton_ops.silu_and_mul(torch.zeros(2, 7, device=device))
    q, k = torch.zeros(3, 4, 8, device=device), torch.zeros(3, 2, 8, device=device)
    with pytest.raises(ValueError, match="cos must be"):
        triton_ops.apply_rotary_qk_(q, k, torch.zeros(3, 8, device=device), torch.zeros(3, 4, device=device))
    with pytest.raises(ValueError, match="unit last stride"):
        triton_ops.apply_rotary_qk_(
            torch.zeros(3, 4, 16, device=device)[..., ::2],
            k,
            torch.zeros(3, 4, device=device),
            torch.zeros(3, 4, device=device),
        )
    cache = torch.zeros(10, 2, 8, device=device)
    with pytest.raises(ValueError, match="slot_mapping must be"):
        triton_ops.store_kv(k, k, cache, cache, torch.zeros(3, dtype=torch.float32, device=device))
    with pytest.raises(ValueError, match="k_flat must be"):
        triton_ops.store_kv(k, k, torch.zeros(10, 3, 8, device=device), cache, torch.zeros(3, dtype=torch.int64))


def test_dispatch_stays_on_torch_for_cpu_tensors():
    assert not use_triton(torch.zeros(1))


@pytest.mark.gpu
def test_cuda_layers_take_the_kernels_and_keep_torch_results():
    """The layers' CUDA dispatch (as the model runs it) against their CPU torch path on the same inputs."""
    dtype = torch.bfloat16
    assert use_triton(torch.zeros(1, device="cuda"))
    norm = RMSNorm(4096, 1e-5).to("cuda", dtype)
    x = _randn(64, 4096, device="cuda", dtype=dtype, seed=8)
    residual = _randn(64, 4096, device="cuda", dtype=dtype, seed=9)
    out, s = norm(x, residual)
    ref_out, ref_s = norm.cpu()(x.cpu(), residual.cpu())
    assert torch.equal(s.cpu(), ref_s)
    _assert_bf16_matches(out, ref_out.cuda())
    g = _randn(64, 2 * 14336, device="cuda", dtype=dtype, seed=10, scale=3.0)
    _assert_bf16_matches(SiluAndMul()(g), SiluAndMul()(g.cpu()).cuda())
