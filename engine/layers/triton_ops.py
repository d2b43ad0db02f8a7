"""Fused elementwise Triton kernels for the decoder layer: RMSNorm (+ residual add), SiLU-and-mul, rotary on q and
k, and the K/V cache write.

Why: a decode step is a few GEMMs per layer plus many tiny elementwise ops. Written as torch ops, RMSNorm is ~9
kernels, rotary ~18, silu*mul 2 and the K/V write 2 (``index_copy_`` each), ~45 launches per layer and ~1500 per
Llama-3-8B step. Even replayed from a CUDA graph each costs 2-4 us of GPU time, which put the step at ~13.5 ms
against a ~8.4 ms memory floor on an H100 (batch 64, bf16). Here each op is one launch: ~10 kernels per layer.

Numerics follow the torch code of the layers (``rms_norm.py``, ``activation.py``, ``rotary_embedding.py``):

- RMSNorm: the residual sum is rounded to the input dtype first, normalised in float32 with IEEE-rounded division
  and square root (as torch's ``rsqrt`` on CPU), cast to the dtype, then multiplied by the weight and rounded.
  Only the float32 sum of squares may be added up in another order than torch's reduction, so a half-precision
  output can differ by one ulp in rare elements.
- SiLU-and-mul: ``silu(gate)`` rounded to the dtype, times ``up``, rounded (as ``F.silu(gate) * up``). ``exp`` is
  the only transcendental; on the GPU Triton's is the fast ``ex2`` approximation, so a half-precision output can
  differ by one ulp in rare elements from torch's.
- Rotary: computed in float32 and rounded once. The torch path rounds ``cos``/``sin`` to the dtype and rounds after
  every product and sum (as transformers does), so in bfloat16 the two differ by a few ulps; in float32 they agree
  to rounding.

Every wrapper launches exactly one kernel whose arguments depend only on shapes and strides (values such as slot
numbers are read on the device), so they are safe inside CUDA-graph capture once compiled by a warm-up run.
Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (the tests do this).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK_ELEMS = 16384  # one program holds a whole row in registers (hidden <= 8192 for the models we serve)
ROTARY_ELEMS_PER_PROGRAM = 512  # half-head elements per rotary program: several programs per token at decode sizes
SILU_BLOCK = 1024


def _num_warps(block_elems: int) -> int:
    """About 16 elements a thread (two 16-byte vectors of bf16): 4096 -> 8 warps, 1024 -> 2."""
    return max(1, min(16, block_elems // 512))


def _check_same_device(name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref.device}, got {t.device}")


# --------------------------------------------------------------------------------------------------- RMSNorm


@triton.jit
def _rms_norm_kernel(
    X,
    Residual,
    Weight,
    Out,
    ResidualOut,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    eps,
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < HIDDEN
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(Residual + row * stride_r + offs, mask=mask, other=0.0)
        # Rounded to the dtype before normalising, as torch's ``x = x + residual`` is.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(ResidualOut + row * stride_ro + offs, x, mask=mask)
    x32 = x.to(tl.float32)
    mean_sq = tl.div_rn(tl.sum(x32 * x32, axis=0), HIDDEN * 1.0)
    # IEEE 1/sqrt (not the approximate rsqrt instruction) to match torch's rsqrt on CPU.
    inv_rms = tl.div_rn(1.0, tl.sqrt_rn(mean_sq + eps))
    normed = (x32 * inv_rms).to(X.dtype.element_ty)
    w = tl.load(Weight + offs, mask=mask, other=0.0)
    out = (normed.to(tl.float32) * w.to(tl.float32)).to(X.dtype.element_ty)
    tl.store(Out + row * stride_o + offs, out, mask=mask)


def _rows_of(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """``t [..., hidden]`` as ``[rows, hidden]`` with a unit last stride (a view when possible)."""
    rows = t.reshape(-1, hidden)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _launch_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., hidden] with hidden >= 1, got shape {tuple(x.shape)}")
    hidden = x.shape[-1]
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    if weight.shape != (hidden,):
        raise ValueError(f"weight must be [{hidden}] (x's last dim), got shape {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight.dtype must equal x.dtype ({x.dtype}), got {weight.dtype}")
    _check_same_device("weight", weight, x)
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"residual must match x ({tuple(x.shape)}, {x.dtype}), got ({tuple(residual.shape)}, {residual.dtype})"
            )
        _check_same_device("residual", residual, x)
    block = triton.next_power_of_2(hidden)
    if block > MAX_BLOCK_ELEMS:
        raise ValueError(f"hidden must be <= {MAX_BLOCK_ELEMS}, got {hidden}")
    x2 = _rows_of(x, hidden)
    weight = weight if weight.stride(0) == 1 else weight.contiguous()
    out = torch.empty_like(x2)
    if residual is None:
        r2 = res_out = x2  # unused: HAS_RESIDUAL=False
    else:
        r2 = _rows_of(residual, hidden)
        res_out = torch.empty_like(x2)
    if x2.shape[0] > 0:
        _rms_norm_kernel[(x2.shape[0],)](
            x2,
            r2,
            weight,
            out,
            res_out,
            x2.stride(0),
            r2.stride(0),
            out.stride(0),
            res_out.stride(0),
            float(eps),
            HIDDEN=hidden,
            BLOCK=block,
            HAS_RESIDUAL=residual is not None,
            num_warps=_num_warps(block),
        )
    out = out.view(x.shape)
    return out, (None if residual is None else res_out.view(x.shape))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x) * weight`` in one launch. ``x [..., hidden]``, ``weight [hidden]`` of x's dtype
    -> ``[..., hidden]``.

    Raises:
        ValueError: shapes, dtypes or devices do not match, or hidden > 16384.
    """
    return _launch_rms_norm(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` (rounded to the dtype), then ``(rms_norm(s), s)``, in one launch.
    ``x, residual [..., hidden]`` of one dtype, ``weight [hidden]`` -> two new ``[..., hidden]`` tensors.

    Raises:
        ValueError: shapes, dtypes or devices do not match, or hidden > 16384.
    """
    return _launch_rms_norm(x, residual, weight, eps)


# --------------------------------------------------------------------------------------------------- SiLU * up


@triton.jit
def _silu_and_mul_kernel(X, Out, stride_x, stride_o, D: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    gate = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + D + offs, mask=mask, other=0.0).to(tl.float32)
    # Rounded to the dtype between silu and the product, as ``F.silu(gate) * up`` is.
    silu = tl.div_rn(gate, 1.0 + tl.exp(-gate)).to(X.dtype.element_ty)
    tl.store(Out + row * stride_o + offs, (silu.to(tl.float32) * up).to(X.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x [..., 2d]`` = ``[gate | up]`` -> ``[..., d]``, in one launch.

    Raises:
        ValueError: x is not floating point or its last dim is odd or zero.
    """
    if x.dim() < 1 or x.shape[-1] == 0 or x.shape[-1] % 2:
        raise ValueError(f"x must be [..., 2 * d] with d >= 1, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    d = x.shape[-1] // 2
    x2 = _rows_of(x, 2 * d)
    out = torch.empty(x2.shape[0], d, dtype=x.dtype, device=x.device)
    block = min(SILU_BLOCK, triton.next_power_of_2(d))
    if x2.shape[0] > 0:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](
            x2, out, x2.stride(0), out.stride(0), D=d, BLOCK=block, num_warps=_num_warps(block) * 2
        )
    return out.view(*x.shape[:-1], d)


# --------------------------------------------------------------------------------------------------- rotary


@triton.jit
def _rotate_heads(base, offs_h, stride_h, num_heads, offs_d, mask_d, cos, sin, HALF: tl.constexpr):
    """Rotates heads ``offs_h`` of one token in place: ``(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)``."""
    mask = (offs_h < num_heads)[:, None] & mask_d[None, :]
    ptr1 = base + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(ptr1, mask=mask, other=0.0)
    x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    tl.store(ptr1, (x1f * cos - x2f * sin).to(x1.dtype), mask=mask)
    tl.store(ptr1 + HALF, (x2f * cos + x1f * sin).to(x1.dtype), mask=mask)


@triton.jit
def _rotary_qk_kernel(
    Q,
    K,
    Cos,
    Sin,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_ct,
    stride_st,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # Grid (tokens, head blocks): program (t, b) rotates q heads and k heads [b * BLOCK_H, (b + 1) * BLOCK_H) of
    # token t; k has fewer heads (GQA), so its part is masked off in the later blocks.
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HALF
    cos = tl.load(Cos + t * stride_ct + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(Sin + t * stride_st + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(Q + t * stride_qt, offs_h, stride_qh, NUM_Q_HEADS, offs_d, mask_d, cos, sin, HALF)
    _rotate_heads(K + t * stride_kt, offs_h, stride_kh, NUM_K_HEADS, offs_d, mask_d, cos, sin, HALF)


def apply_rotary_qk_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotates ``q [T, Hq, D]`` and ``k [T, Hkv, D]`` in place ("rotate half" layout, as
    :func:`engine.layers.rotary_embedding.apply_rotary`) in one launch. ``cos``/``sin``: ``[T, D/2]`` (float32).
    q and k may be strided views (e.g. of the fused qkv projection) with a unit last stride; computed in float32
    and rounded once.

    Raises:
        ValueError: shapes, dtypes or strides do not fit.
    """
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q and k must be [T, H, D], got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    num_tokens, num_q_heads, head_dim = q.shape
    if k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(f"k must be [{num_tokens}, H_kv, {head_dim}] like q, got shape {tuple(k.shape)}")
    if head_dim % 2 or head_dim == 0:
        raise ValueError(f"head_dim must be even and >= 2, got {head_dim}")
    if q.dtype != k.dtype or not q.is_floating_point():
        raise ValueError(f"q and k must share one floating-point dtype, got {q.dtype} and {k.dtype}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(f"q and k must have a unit last stride, got {q.stride()} and {k.stride()}")
    half = head_dim // 2
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (num_tokens, half):
            raise ValueError(f"{name} must be [{num_tokens}, {half}], got shape {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit last stride, got {t.stride()}")
        _check_same_device(name, t, q)
    _check_same_device("k", k, q)
    num_k_heads = k.shape[1]
    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(max(num_q_heads, num_k_heads)), ROTARY_ELEMS_PER_PROGRAM // block_half))
    if num_tokens == 0:
        return
    grid = (num_tokens, triton.cdiv(max(num_q_heads, num_k_heads), block_h))
    _rotary_qk_kernel[grid](
        q,
        k,
        cos,
        sin,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        sin.stride(0),
        NUM_Q_HEADS=num_q_heads,
        NUM_K_HEADS=num_k_heads,
        HALF=half,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        num_warps=_num_warps(block_h * block_half * 4),
    )


# --------------------------------------------------------------------------------------------------- K/V write


@triton.jit
def _store_kv_kernel(
    K,
    V,
    KCache,
    VCache,
    SlotMapping,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kct,
    stride_kch,
    stride_vct,
    stride_vch,
    stride_slot,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    row = tl.load(SlotMapping + t * stride_slot).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    mask = (offs_h < NUM_HEADS) & (offs_d < HEAD_DIM)
    k = tl.load(K + t * stride_kt + offs_h * stride_kh + offs_d, mask=mask)
    v = tl.load(V + t * stride_vt + offs_h * stride_vh + offs_d, mask=mask)
    tl.store(KCache + row * stride_kct + offs_h * stride_kch + offs_d, k, mask=mask)
    tl.store(VCache + row * stride_vct + offs_h * stride_vch + offs_d, v, mask=mask)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """``k_flat[slot_mapping[t]] = k[t]`` and the same for v, in one launch (``index_copy_`` twice, fused).
    ``k, v [T, H_kv, D]`` (strided views allowed, unit last stride); ``k_flat, v_flat [rows, H_kv, D]`` of the same
    dtype; ``slot_mapping [T]`` int32/int64 rows, which must be valid and mapped (not checked: that would sync).

    Raises:
        ValueError: shapes, dtypes or strides do not fit.
    """
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"k and v must be [T, H_kv, D] of one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    num_tokens, num_heads, head_dim = k.shape
    for name, cache in (("k_flat", k_flat), ("v_flat", v_flat)):
        if cache.dim() != 3 or cache.shape[1:] != k.shape[1:]:
            raise ValueError(f"{name} must be [rows, {num_heads}, {head_dim}], got shape {tuple(cache.shape)}")
        if cache.dtype != k.dtype:
            raise ValueError(f"{name}.dtype must equal k.dtype ({k.dtype}), got {cache.dtype}")
        if cache.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit last stride, got {cache.stride()}")
        _check_same_device(name, cache, k)
    if v.dtype != k.dtype:
        raise ValueError(f"v.dtype must equal k.dtype ({k.dtype}), got {v.dtype}")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"k and v must have a unit last stride, got {k.stride()} and {v.stride()}")
    if slot_mapping.shape != (num_tokens,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"slot_mapping must be [{num_tokens}] int32 or int64, "
            f"got shape {tuple(slot_mapping.shape)} {slot_mapping.dtype}"
        )
    _check_same_device("v", v, k)
    _check_same_device("slot_mapping", slot_mapping, k)
    if num_tokens == 0:
        return
    block_h = triton.next_power_of_2(num_heads)
    block_d = triton.next_power_of_2(head_dim)
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_flat,
        v_flat,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_flat.stride(0),
        k_flat.stride(1),
        v_flat.stride(0),
        v_flat.stride(1),
        slot_mapping.stride(0),
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=_num_warps(block_h * block_d * 2),
    )
