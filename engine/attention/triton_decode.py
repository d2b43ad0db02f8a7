"""Split-KV ("flash-decoding") attention for one new token per sequence, reading the vAttention cache in place.

Each sequence's K/V is a contiguous run of rows of the flat cache view (``k_flat[slot_start : slot_start + len]``),
so the kernel needs a start row and a length per sequence, never a block table.

Two launches:

1. ``_split_kv_kernel``, grid ``(kv_heads, batch, num_splits)``: a program loads the ``GROUP_SIZE`` query heads that
   share one KV head (GQA), so each K/V byte is read once for the whole group, and streams its split of the sequence
   in ``BLOCK_N``-token tiles with an online softmax. The group is padded to ``BLOCK_H = 16`` rows so that both
   products run on tensor cores (``tl.dot`` needs 16 rows); the kernel is bound by memory, the wasted rows are free.
2. ``split_kv_reduce_kernel``, grid ``(batch, q_heads)``: merges the splits' partial outputs by their log-sum-exp.
   Skipped when one split covers every sequence (large batches): the first kernel then writes the output itself.

The number of splits is chosen so that ``batch * kv_heads * num_splits`` fills the GPU about four programs deep,
with power-of-two split lengths so that the autotuner (keyed on the split length) sees few distinct problems.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
import triton.testing

MIN_SPLIT_TOKENS = 64  # a split shorter than this spends more on its partial output than on K/V
MAX_SPLITS = 64  # the reduce kernel holds every split of one head in registers
BLOCK_H = 16  # query rows per program: GQA group padded to the tensor-core minimum
PROGRAMS_PER_SM = 4
INTERPRETER_NUM_SMS = 4  # stand-in when running on CPU tensors under TRITON_INTERPRET=1

# Shared with the paged twin in benchmarks/ so that both kernels are tuned over the same space.
DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
    for block_n, warps, stages in [
        (32, 4, 3),
        (64, 4, 2),
        (64, 4, 3),
        (64, 8, 3),
        (128, 4, 2),
        (128, 8, 2),
        (128, 8, 3),
        (64, 4, 4),
    ]
]
# Used where autotuning is impossible or pointless (the CPU interpreter).
DEFAULT_CONFIG = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


def autotune_bench(fn, quantiles):
    """Short timing runs: a memory-bound kernel's configs differ by far more than the noise of 25 ms."""
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


def prune_configs(configs, named_args, **kwargs):
    """Drops tiles longer than the split (they would be mostly masked)."""
    split_len = named_args["split_len"]
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= split_len]
    return kept or configs[:1]


@triton.jit
def _split_kv_kernel(
    Q,
    K,
    V,
    SlotStarts,
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

    # The only line that knows the cache layout: the sequence's rows start at its slot.
    row0 = tl.load(SlotStarts + b).to(tl.int64)
    k_head = K + kv_head * stride_kh
    v_head = V + kv_head * stride_vh

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for n0 in tl.range(start, end, BLOCK_N):
        tok = n0 + offs_n
        mask_n = tok < end
        # With D a power of two the row mask alone keeps the loads 16-byte vectorised.
        mask_nd = mask_n[:, None] if BLOCK_D == HEAD_DIM else mask_n[:, None] & mask_d[None, :]
        # The tile's first row in 64 bits: ``token * row stride`` passes 2**31 elements (the token-major layout's row
        # stride is 2 * L * H * D) long before a sequence is long; offsets within a tile stay small.
        k_tile = k_head + (row0 + n0) * stride_kt  # row0 is int64: the product is too
        v_tile = v_head + (row0 + n0) * stride_vt
        k = tl.load(k_tile + offs_n[:, None] * stride_kt + offs_d[None, :], mask=mask_nd, other=0.0)
        qk = tl.dot(q, tl.trans(k)) * scale_log2  # [BLOCK_H, BLOCK_N], log2 domain
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_tile + offs_n[:, None] * stride_vt + offs_d[None, :], mask=mask_nd, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    has_keys = l_i > 0.0  # false for a split past the sequence's end (or an empty sequence)
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


_split_kv_autotuned = triton.autotune(
    configs=DECODE_CONFIGS,
    key=["split_len", "GROUP_SIZE", "HEAD_DIM"],
    prune_configs_by={"early_config_prune": prune_configs},
    do_bench=autotune_bench,
)(_split_kv_kernel)


@triton.jit
def split_kv_reduce_kernel(
    MidO,
    MidLse,
    Out,
    num_splits,
    stride_mob,
    stride_moh,
    stride_mos,
    stride_mlb,
    stride_mlh,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Merges ``num_splits`` partial outputs ``[B, Hq, S, D]`` (fp32, each normalised by its own sum) weighted by
    ``2 ** lse`` ``[B, Hq, S]`` into ``Out [B, Hq, D]``."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    mask_d = offs_d < HEAD_DIM
    lse = tl.load(MidLse + b * stride_mlb + h * stride_mlh + offs_s, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    total = tl.sum(w, 0)
    part = tl.load(
        MidO + b * stride_mob + h * stride_moh + offs_s[:, None] * stride_mos + offs_d[None, :],
        mask=mask_s[:, None] & mask_d[None, :],
        other=0.0,
    )
    out = tl.sum(part * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=mask_d)


_NUM_SMS: dict[torch.device, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_NUM_SMS
    if device not in _NUM_SMS:
        _NUM_SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _NUM_SMS[device]


def plan_splits(
    batch_size: int, num_kv_heads: int, max_seq_len: int, num_sms: int, num_splits: int | None = None
) -> tuple[int, int]:
    """``(num_splits, split_len)``: how each sequence is cut so that the grid fills ``num_sms``.

    ``split_len`` is a power of two >= ``MIN_SPLIT_TOKENS`` (unless ``num_splits`` is forced), and
    ``num_splits * split_len >= max_seq_len``.
    """
    max_seq_len = max(max_seq_len, 1)
    if num_splits is None:
        wanted = triton.cdiv(PROGRAMS_PER_SM * num_sms, batch_size * num_kv_heads)
        wanted = max(1, min(wanted, MAX_SPLITS, triton.cdiv(max_seq_len, MIN_SPLIT_TOKENS)))
        split_len = max(MIN_SPLIT_TOKENS, triton.next_power_of_2(triton.cdiv(max_seq_len, wanted)))
    else:
        if not 1 <= num_splits <= MAX_SPLITS:
            raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
        split_len = triton.cdiv(max_seq_len, num_splits)
    return triton.cdiv(max_seq_len, split_len), split_len


def check_decode_inputs(
    q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, seq_lens: torch.Tensor, batch_index: torch.Tensor
) -> None:
    """Shape checks shared with the paged twin; ``batch_index`` is ``slot_starts`` or the block table."""
    if q.dim() != 3 or k_flat.dim() != 3 or v_flat.shape != k_flat.shape:
        raise ValueError(
            f"expected q [B, Hq, D] and k_flat/v_flat [rows, Hkv, D], got {tuple(q.shape)}, "
            f"{tuple(k_flat.shape)}, {tuple(v_flat.shape)}"
        )
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_flat.shape[1]
    if k_flat.shape[2] != head_dim or num_heads % num_kv_heads:
        raise ValueError(
            f"q heads {num_heads} must be a multiple of kv heads {num_kv_heads} and head dims must "
            f"match ({head_dim} vs {k_flat.shape[2]})"
        )
    if num_heads // num_kv_heads > BLOCK_H:
        raise ValueError(f"GQA group of {num_heads // num_kv_heads} query heads exceeds {BLOCK_H}")
    if q.stride(-1) != 1 or k_flat.stride(-1) != 1 or v_flat.stride(-1) != 1:
        raise ValueError("q, k_flat and v_flat need a contiguous last dimension")
    if seq_lens.shape != (batch,) or batch_index.shape[0] != batch:
        raise ValueError(
            f"seq_lens and slot starts / block table need {batch} rows, got {tuple(seq_lens.shape)} "
            f"and {tuple(batch_index.shape)}"
        )


def launch_decode(
    stage1, q, k_flat, v_flat, seq_lens, scale, max_seq_len, num_splits, config, index_args, **index_constexprs
):
    """Runs ``stage1`` (a ``(plain, autotuned)`` pair: the contiguous or the paged split kernel, whose addressing
    arguments are ``index_args`` and ``index_constexprs``) and the reduce. ``config``: fixed tile parameters, or
    None to autotune."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_flat.shape[1]
    out = torch.empty_like(q)
    if batch == 0:
        return out
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max().item())  # a host sync; callers on the hot path pass it
    splits, split_len = plan_splits(batch, num_kv_heads, max_seq_len, _num_sms(q.device), num_splits)
    direct = splits == 1
    if direct:
        mid_o = mid_lse = out  # unused
        mid_strides = (0, 0, 0, 0, 0)
    else:
        mid_o = torch.empty(batch, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
        mid_lse = torch.empty(batch, num_heads, splits, dtype=torch.float32, device=q.device)
        mid_strides = (mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1))
    block_d = triton.next_power_of_2(head_dim)
    kernel, extra = (stage1[0], config) if config is not None else (stage1[1], {})
    kernel[(num_kv_heads, batch, splits)](
        q,
        k_flat,
        v_flat,
        *index_args,
        seq_lens,
        out,
        mid_o,
        mid_lse,
        scale * 1.4426950408889634,  # log2(e): the kernel uses exp2
        q.stride(0),
        q.stride(1),
        k_flat.stride(0),
        k_flat.stride(1),
        v_flat.stride(0),
        v_flat.stride(1),
        out.stride(0),
        out.stride(1),
        *mid_strides,
        split_len,
        GROUP_SIZE=num_heads // num_kv_heads,
        BLOCK_H=BLOCK_H,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        DIRECT_OUT=direct,
        **index_constexprs,
        **extra,
    )
    if not direct:
        split_kv_reduce_kernel[(batch, num_heads)](
            mid_o,
            mid_lse,
            out,
            splits,
            *mid_strides,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_S=max(triton.next_power_of_2(splits), 2),
            num_warps=4,
        )
    return out


def triton_decode_attention(
    q: torch.Tensor,
    k_flat: torch.Tensor,
    v_flat: torch.Tensor,
    slot_starts: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Decode attention (one query token per sequence) over K/V stored contiguously per sequence.

    Args:
        q: ``[B, Hq, D]`` queries, contiguous last dimension.
        k_flat, v_flat: ``[rows, Hkv, D]`` cache views (``VirtualKVCache.k_flat[layer]``); ``Hq % Hkv == 0``.
        slot_starts: ``[B]`` int32/int64, first row of each sequence (``slot * cache.slot_stride_tokens``);
            any order.
        seq_lens: ``[B]`` int32, keys per sequence (rows ``[slot_starts[i], slot_starts[i] + seq_lens[i])``,
            all mapped). A sequence of length 0 gets a zero output.
        scale: softmax scale (usually ``D ** -0.5``).
        max_seq_len: ``max(seq_lens)`` if the caller knows it on the host (avoids a device sync).
        num_splits: force the number of splits per sequence (tests); default chosen from the GPU size.
        config: fixed ``{"BLOCK_N", "num_warps", "num_stages"}`` instead of autotuning (always fixed on CPU).

    Returns:
        ``[B, Hq, D]`` in ``q``'s dtype.
    """
    check_decode_inputs(q, k_flat, v_flat, seq_lens, slot_starts)
    if config is None and q.device.type != "cuda":
        config = DEFAULT_CONFIG
    return launch_decode(
        (_split_kv_kernel, _split_kv_autotuned),
        q,
        k_flat,
        v_flat,
        seq_lens,
        scale,
        max_seq_len,
        num_splits,
        config,
        (slot_starts,),
    )
