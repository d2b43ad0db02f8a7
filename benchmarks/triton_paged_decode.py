"""Benchmark-only paged twin of ``engine/attention/triton_decode.py``: the same split-KV decode kernel reading K/V
through a block table (vLLM-style pages of ``PAGE_SIZE`` tokens), so that paged and non-paged are compared with
everything but the address computation equal: same grid, tiles, autotune space, split plan and reduce kernel.

The cache is ``[num_pages * PAGE_SIZE, Hkv, D]`` (a page is ``PAGE_SIZE`` consecutive rows, the layout of vLLM's
``[num_blocks, block_size, Hkv, D]``); ``block_table[b, j]`` is the page holding tokens ``[j*PAGE_SIZE, (j+1)*PAGE_SIZE)``
of sequence ``b``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.attention.triton_decode import (
    DECODE_CONFIGS,
    DEFAULT_CONFIG,
    autotune_bench,
    check_decode_inputs,
    launch_decode,
    prune_configs,
)


@triton.jit
def _paged_split_kv_kernel(
    Q,
    K,
    V,
    BlockTable,
    stride_btb,
    SeqLens,
    Out,
    MidO,
    MidLse,
    scale_log2,
    stride_qb,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ob,
    stride_oh,
    stride_mob,
    stride_moh,
    stride_mos,
    stride_mlb,
    stride_mlh,
    split_len,
    GROUP_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DIRECT_OUT: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    # KV heads vary fastest across the grid: the programs reading one token's heads (adjacent 256-byte pieces of
    # one cache row) run side by side.
    kv_head = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(SeqLens + b)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_h = offs_h < GROUP_SIZE
    mask_d = offs_d < HEAD_DIM
    heads = kv_head * GROUP_SIZE + offs_h
    mask_hd = mask_h[:, None] & mask_d[None, :]

    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=mask_hd, other=0.0)

    # Paged addressing: each token's row comes from its page's entry in the block table.
    table = BlockTable + b.to(tl.int64) * stride_btb
    k_base = K + kv_head * stride_kh
    v_base = V + kv_head * stride_vh

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for n0 in tl.range(start, end, BLOCK_N):
        tok = n0 + offs_n
        mask_n = tok < end
        # With D a power of two the row mask alone keeps the loads 16-byte vectorised.
        mask_nd = mask_n[:, None] if BLOCK_D == HEAD_DIM else mask_n[:, None] & mask_d[None, :]
        page = tl.load(table + tok // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
        row = page * PAGE_SIZE + tok % PAGE_SIZE
        k = tl.load(k_base + row[:, None] * stride_kt + offs_d[None, :], mask=mask_nd, other=0.0)
        qk = tl.dot(q, tl.trans(k)) * scale_log2
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + row[:, None] * stride_vt + offs_d[None, :], mask=mask_nd, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if DIRECT_OUT:
        tl.store(
            Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
            out.to(Out.dtype.element_ty),
            mask=mask_hd,
        )
    else:
        tl.store(
            MidO + b * stride_mob + heads[:, None] * stride_moh + split * stride_mos + offs_d[None, :],
            out,
            mask=mask_hd,
        )
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(MidLse + b * stride_mlb + heads * stride_mlh + split, lse, mask=mask_h)


_paged_split_kv_autotuned = triton.autotune(
    configs=[triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages) for c in DECODE_CONFIGS],
    key=["split_len", "GROUP_SIZE", "HEAD_DIM", "PAGE_SIZE"],
    prune_configs_by={"early_config_prune": prune_configs},
    do_bench=autotune_bench,
)(_paged_split_kv_kernel)


def triton_paged_decode_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    page_size: int,
    *,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Decode attention over a paged cache.

    Args:
        q: ``[B, Hq, D]``.
        k_pages, v_pages: ``[num_pages * page_size, Hkv, D]``.
        block_table: ``[B, max_pages_per_seq]`` int32, page of each ``page_size``-token block of each sequence.
        seq_lens: ``[B]`` int32.
        page_size: tokens per page (a power of two; BLOCK_N tiles may span several pages).
    Returns:
        ``[B, Hq, D]``.
    """
    check_decode_inputs(q, k_pages, v_pages, seq_lens, block_table)
    if block_table.stride(-1) != 1:
        raise ValueError("block_table needs a contiguous last dimension")
    if config is None and q.device.type != "cuda":
        config = DEFAULT_CONFIG
    return launch_decode(
        (_paged_split_kv_kernel, _paged_split_kv_autotuned),
        q,
        k_pages,
        v_pages,
        seq_lens,
        scale,
        max_seq_len,
        num_splits,
        config,
        (block_table, block_table.stride(0)),
        PAGE_SIZE=page_size,
    )
