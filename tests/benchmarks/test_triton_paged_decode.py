"""The benchmark-only paged twin of the Triton decode kernel (benchmarks/triton_paged_decode.py) against fp32 SDPA on
K/V gathered through its block table, and its Hopper compilation, with the engine kernel's test helpers."""

from __future__ import annotations

import pytest
import torch

# Sets TRITON_INTERPRET on CPU machines: imported before anything that imports triton.
from tests.engine.triton_interpreter import devices

# isort: split
from benchmarks import triton_paged_decode  # noqa: E402
from benchmarks.triton_paged_decode import triton_paged_decode_attention  # noqa: E402
from tests.engine.test_triton_decode import (  # noqa: E402, F401
    _interpreter_scalar_loop_bounds,
    hopper_load_counts,
    reference,
    tolerance,
)


def _devices():
    return devices(triton_paged_decode._paged_split_kv_kernel)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("num_splits", [None, 2])
def test_paged_twin_matches_sdpa_on_scattered_pages(device, num_splits):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    page_size, lens = 16, [70, 16, 1]
    gen = torch.Generator().manual_seed(4)
    pages_per_seq = [-(-n // page_size) for n in lens]
    num_pages = sum(pages_per_seq) + 3
    k_pages = torch.randn(num_pages * page_size, 2, 64, generator=gen).to(device, dtype)
    v_pages = torch.randn(num_pages * page_size, 2, 64, generator=gen).to(device, dtype)
    perm = torch.randperm(num_pages, generator=gen)
    table = torch.zeros(len(lens), max(pages_per_seq), dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages_per_seq):
        table[b, :n] = perm[used : used + n]
        used += n
    q = torch.randn(len(lens), 8, 64, generator=gen).to(device, dtype)
    out = triton_paged_decode_attention(
        q,
        k_pages,
        v_pages,
        table.to(device),
        torch.tensor(lens, dtype=torch.int32, device=device),
        0.125,
        page_size,
        num_splits=num_splits,
    )
    for b, n in enumerate(lens):
        rows = (table[b, : pages_per_seq[b]].long()[:, None] * page_size + torch.arange(page_size)).flatten()[:n]
        ref = reference(q[b].cpu(), k_pages.cpu()[rows], v_pages.cpu()[rows], 0.125)
        torch.testing.assert_close(out[b].float().cpu(), ref, atol=tolerance(dtype), rtol=tolerance(dtype))


def test_compiles_for_hopper_with_pipelined_16_byte_loads():
    counts = hopper_load_counts("benchmarks.triton_paged_decode:_paged_split_kv_kernel", paged=True)
    assert counts["cp_async_16B"] > 0 and counts["ld_b16"] == 0, counts
