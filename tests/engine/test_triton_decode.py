"""The Triton split-KV decode kernel (engine/attention/triton_decode.py) against fp32 SDPA on gathered K/V (its
paged twin in benchmarks/ is tested in tests/benchmarks/test_triton_paged_decode.py, with the helpers here).

Without a GPU the kernels run under Triton's interpreter on CPU tensors (see ``triton_interpreter``); the ``gpu``
tests run the compiled, autotuned kernels.
"""

from __future__ import annotations

import os

import pytest
import torch

# Sets TRITON_INTERPRET on CPU machines: imported before anything that imports triton.
from tests.engine.triton_interpreter import devices, triton_interpreter

# isort: split
from engine.attention import triton_decode  # noqa: E402
from engine.attention.triton_decode import plan_splits, triton_decode_attention  # noqa: E402
from kvcache import KVCacheConfig, VirtualKVCache  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _interpreter_scalar_loop_bounds():
    """Triton 3.6's interpreter turns a loaded scalar into an int with ``int(array_of_shape_(1,))``, which numpy
    >= 2.3 refuses, so loops with runtime bounds fail; index the single element instead."""
    original = triton_interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    triton_interpreter._patch_lang_tensor = patched
    yield
    triton_interpreter._patch_lang_tensor = original


def _devices():
    return devices(triton_decode._split_kv_kernel)


def reference(q, k_rows, v_rows, scale):
    """fp32 SDPA for one sequence: ``q [Hq, D]``, ``k_rows/v_rows [L, Hkv, D]`` -> ``[Hq, D]``."""
    group = q.shape[0] // k_rows.shape[1]
    k = k_rows.float().transpose(0, 1).repeat_interleave(group, 0)  # [Hq, L, D]
    v = v_rows.float().transpose(0, 1).repeat_interleave(group, 0)
    if k.shape[1] == 0:
        return torch.zeros_like(q, dtype=torch.float32)
    return torch.nn.functional.scaled_dot_product_attention(q.float()[:, None], k, v, scale=scale)[:, 0]


def make_contiguous_case(device, dtype, lens, num_heads, num_kv_heads, head_dim, stride_rows, seed=0):
    """A flat cache of ``len(lens)`` slots of ``stride_rows`` rows, sequences placed in reverse slot order."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(lens)
    k = torch.randn(batch * stride_rows, num_kv_heads, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(batch * stride_rows, num_kv_heads, head_dim, generator=gen).to(device, dtype)
    q = torch.randn(batch, num_heads, head_dim, generator=gen).to(device, dtype)
    slot_starts = torch.tensor([(batch - 1 - b) * stride_rows for b in range(batch)], dtype=torch.int64, device=device)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    return q, k, v, slot_starts, seq_lens


def tolerance(dtype):
    return {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 2), (4, 4)])
def test_matches_sdpa_over_contiguous_slots(device, num_splits, num_heads, num_kv_heads):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    lens = [1, 200, 77, 128]
    q, k, v, starts, seq_lens = make_contiguous_case(device, dtype, lens, num_heads, num_kv_heads, 64, 256)
    scale = 64**-0.5
    out = triton_decode_attention(q, k, v, starts, seq_lens, scale, max_seq_len=max(lens), num_splits=num_splits)
    assert out.shape == q.shape and out.dtype == dtype
    for b, length in enumerate(lens):
        s = int(starts[b])
        ref = reference(q[b].cpu(), k[s : s + length].cpu(), v[s : s + length].cpu(), scale)
        torch.testing.assert_close(out[b].float().cpu(), ref, atol=tolerance(dtype), rtol=tolerance(dtype))


@pytest.mark.parametrize("device", _devices())
def test_half_precision_and_odd_head_dim(device):
    dtype = torch.float16
    lens = [33, 5]
    q, k, v, starts, seq_lens = make_contiguous_case(device, dtype, lens, 6, 2, 48, 64, seed=1)
    out = triton_decode_attention(q, k, v, starts, seq_lens, 0.2)
    for b, length in enumerate(lens):
        s = int(starts[b])
        ref = reference(q[b].cpu(), k[s : s + length].cpu(), v[s : s + length].cpu(), 0.2)
        torch.testing.assert_close(out[b].float().cpu(), ref, atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("device", _devices())
def test_empty_sequence_gives_zeros_and_splits_past_the_end_are_ignored(device):
    lens = [0, 3, 150]
    q, k, v, starts, seq_lens = make_contiguous_case(device, torch.float32, lens, 4, 2, 32, 160, seed=2)
    out = triton_decode_attention(q, k, v, starts, seq_lens, 0.3, num_splits=4)
    assert torch.equal(out[0].cpu(), torch.zeros(4, 32))
    assert torch.isfinite(out).all()
    s = int(starts[1])
    tol = 1e-4 if device == "cpu" else 5e-3  # tl.dot runs fp32 inputs as TF32 on the GPU
    torch.testing.assert_close(
        out[1].cpu(), reference(q[1].cpu(), k[s : s + 3].cpu(), v[s : s + 3].cpu(), 0.3), atol=tol, rtol=tol
    )


@pytest.mark.parametrize("device", _devices())
def test_reads_a_virtual_kv_cache_in_place(device):
    """Over the real cache (host mmap or CUDA VMM): slots mapped only up to their lengths, read without copies."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    config = KVCacheConfig(
        num_layers=2,
        num_kv_heads=2,
        head_dim=64,
        max_batch_size=4,
        max_seq_len=1024,
        dtype=dtype,
        device=device,
        kv_cache_memory_bytes=64 << 20,
    )
    cache = VirtualKVCache(config)
    try:
        gen = torch.Generator().manual_seed(3)
        lens = [300, 1, 1000]
        slots = [cache.allocate(n) for n in lens]
        layer = 1
        for slot, n in zip(slots, lens):
            cache.k[layer][slot, :n] = torch.randn(n, 2, 64, generator=gen).to(device, dtype)
            cache.v[layer][slot, :n] = torch.randn(n, 2, 64, generator=gen).to(device, dtype)
        q = torch.randn(len(lens), 8, 64, generator=gen).to(device, dtype)
        starts = torch.tensor(slots, dtype=torch.int64, device=device) * cache.slot_stride_tokens
        seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
        out = triton_decode_attention(q, cache.k_flat[layer], cache.v_flat[layer], starts, seq_lens, 0.125)
        for b, (slot, n) in enumerate(zip(slots, lens)):
            ref = reference(q[b].cpu(), cache.k[layer][slot, :n].cpu(), cache.v[layer][slot, :n].cpu(), 0.125)
            torch.testing.assert_close(out[b].float().cpu(), ref, atol=tolerance(dtype), rtol=tolerance(dtype))
    finally:
        cache.close()


def test_split_plan_fills_the_gpu_with_power_of_two_splits():
    # H100: 132 SMs, Llama-3-8B: 8 KV heads.
    assert plan_splits(256, 8, 16384, 132) == (1, 16384)  # the batch alone fills the GPU: no reduce
    splits, split_len = plan_splits(1, 8, 16384, 132)
    assert split_len & (split_len - 1) == 0 and splits * split_len >= 16384 and splits * 8 >= 132
    assert plan_splits(1, 8, 10, 132) == (1, 64)  # never below the minimum split
    assert plan_splits(2, 2, 100, 132, num_splits=3) == (3, 34)
    with pytest.raises(ValueError, match="num_splits"):
        plan_splits(2, 2, 100, 132, num_splits=0)


def test_rejects_bad_shapes():
    q = torch.zeros(2, 6, 64)
    k = torch.zeros(10, 4, 64)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        triton_decode_attention(q, k, k, torch.zeros(2, dtype=torch.int64), torch.ones(2, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="seq_lens"):
        triton_decode_attention(
            q,
            torch.zeros(10, 2, 64),
            torch.zeros(10, 2, 64),
            torch.zeros(3, dtype=torch.int64),
            torch.ones(2, dtype=torch.int32),
            1.0,
        )


_HOPPER_COMPILE = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

module, name = sys.argv[1].split(":")
fn = getattr(importlib.import_module(module), name)
paged = sys.argv[2] == "paged"
constexprs = dict(GROUP_SIZE=4, BLOCK_H=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_N=64, DIRECT_OUT=False)
if paged:
    constexprs["PAGE_SIZE"] = 16
pointers = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "MidO": "*fp32", "MidLse": "*fp32",
            "SlotStarts": "*i64", "SeqLens": "*i32", "BlockTable": "*i32"}
signature = {n: "constexpr" if n in constexprs else pointers.get(n, "fp32" if n == "scale_log2" else "i32")
             for n in fn.arg_names}
# The 16-byte alignment the launcher finds at run time (cache rows of 2 KiB, torch allocations).
aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
           if signature[n] not in ("constexpr", "fp32")}
source = ASTSource(fn=fn, signature=signature, attrs=aligned,
                   constexprs={(fn.arg_names.index(n),): v for n, v in constexprs.items()})
ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3}).asm["ptx"]
print(json.dumps({"cp_async_16B": ptx.count("cp.async.cg.shared.global"), "ld_b16": ptx.count("ld.global.b16")}))
"""


def hopper_load_counts(kernel: str, paged: bool) -> dict:
    """Compiles ``kernel`` (``"module:function"``) at Llama-3-8B shapes ahead of time for sm_90 (no GPU needed) and
    counts its 16-byte ``cp.async`` and scalar 2-byte global loads in the PTX. In a subprocess: this process's
    triton may be in interpreter mode."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, "-c", _HOPPER_COMPILE, kernel, "paged" if paged else "contiguous"],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_compiles_for_hopper_with_pipelined_16_byte_loads():
    """K/V tiles must be fetched by 16-byte cp.async (vectorised and software-pipelined), the property the
    bandwidth figures rest on; scalar 2-byte loads would mean a slow kernel on the GPU."""
    counts = hopper_load_counts("engine.attention.triton_decode:_split_kv_kernel", paged=False)
    assert counts["cp_async_16B"] > 0 and counts["ld_b16"] == 0, counts
