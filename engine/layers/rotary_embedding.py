"""Rotary position embedding (RoPE), "rotate half" (GPT-NeoX / Hugging Face Llama) layout.

Supported ``rope_type``: ``default``, ``linear``, ``llama3`` (Llama 3.1 frequency scaling), ``dynamic``
(NTK-aware, equal to ``default`` up to ``max_position_embeddings``, the longest sequence the engine allows)
and ``yarn`` (Qwen2.5's long-context scaling). Parameters are read from the Hugging Face config: ``rope_parameters`` (transformers 5) or the
older ``rope_theta`` + ``rope_scaling`` pair.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn")


def rope_parameters_of(hf_config: Any) -> dict:
    """The RoPE parameter dict of a HF config, normalised to hold ``rope_type`` and ``rope_theta``."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    legacy = getattr(hf_config, "rope_scaling", None) or {}
    for key, value in legacy.items():
        params.setdefault(key, value)
    params.setdefault("rope_type", params.get("type", "default"))
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(hf_config, "rope_theta", None) or 10000.0
    return params


def llama3_inv_freq(inv_freq: torch.Tensor, params: dict, max_position_embeddings: int) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by ``factor``, short ones kept, the band in
    between interpolated smoothly (keeps local resolution while stretching the context)."""
    factor = float(params["factor"])
    low_freq_factor = float(params["low_freq_factor"])
    high_freq_factor = float(params["high_freq_factor"])
    old_context_len = params.get("original_max_position_embeddings") or max_position_embeddings
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def yarn_inv_freq(
    rope_theta: float, rotary_dim: int, params: dict, max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023), as transformers computes it: frequencies that turn fewer than ``beta_slow`` times
    over the original context are divided by ``factor``, those turning more than ``beta_fast`` times are kept, a
    linear ramp in between. Returns ``(inv_freq, attention_factor)``, the factor scaling cos and sin."""
    dim, base = rotary_dim, rope_theta
    original = params.get("original_max_position_embeddings") or max_position_embeddings
    factor = params.get("factor") or max_position_embeddings / original
    factor = float(factor)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        if params.get("mscale") and params.get("mscale_all_dim"):
            attention_factor = mscale(factor, params["mscale"]) / mscale(factor, params["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / (factor * pos_freqs) * (1 - extrapolation) + 1.0 / pos_freqs * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """``forward(positions [T]) -> (cos, sin)`` each ``[T, rotary_dim / 2]`` float32, computed
    once per forward and shared by all layers; :func:`apply_rotary` applies them to q/k."""

    def __init__(
        self,
        head_dim: int,
        rope_theta: float,
        rope_type: str = "default",
        rope_params: dict | None = None,
        max_position_embeddings: int = 2048,
    ) -> None:
        super().__init__()
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_type must be one of {SUPPORTED_ROPE_TYPES}, got {rope_type!r}")
        params = rope_params or {}
        attention_scaling = 1.0
        rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        if rotary_dim != head_dim:
            raise ValueError(f"partial_rotary_factor must be 1.0, got {params.get('partial_rotary_factor')}")
        inv_freq = 1.0 / (rope_theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
        if rope_type == "linear":
            inv_freq = inv_freq / float(params["factor"])
        elif rope_type == "llama3":
            inv_freq = llama3_inv_freq(inv_freq, params, max_position_embeddings)
        elif rope_type == "yarn":
            inv_freq, attention_scaling = yarn_inv_freq(rope_theta, rotary_dim, params, max_position_embeddings)
        # "dynamic" rescales only past max_position_embeddings, which the engine never reaches.
        self.head_dim = head_dim
        self.attention_scaling = attention_scaling
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq.unsqueeze(0)
        if self.attention_scaling != 1.0:
            return freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling
        return freqs.cos(), freqs.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, H, D]`` by position: pairs ``(x[i], x[i + D/2])`` rotate by the angle of
    frequency ``i``. ``cos``/``sin``: ``[T, D/2]``. Computed in ``x``'s dtype, like transformers."""
    cos = cos.unsqueeze(1).to(x.dtype)
    sin = sin.unsqueeze(1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def get_rope(hf_config: Any, head_dim: int) -> RotaryEmbedding:
    """Build the rotary embedding described by a HF config."""
    params = rope_parameters_of(hf_config)
    return RotaryEmbedding(
        head_dim=head_dim,
        rope_theta=float(params["rope_theta"]),
        rope_type=params["rope_type"],
        rope_params=params,
        max_position_embeddings=getattr(hf_config, "max_position_embeddings", 2048),
    )
