"""Rotary position embedding (RoPE), "rotate half" (GPT-NeoX / Hugging Face Llama) layout.

Supported ``rope_type``: ``default``, ``linear`` and ``llama3`` (Llama 3.1 frequency scaling).
Parameters are read from the Hugging Face config: ``rope_parameters`` (transformers 5) or the
older ``rope_theta`` + ``rope_scaling`` pair.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


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
        rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        if rotary_dim != head_dim:
            raise ValueError(f"partial_rotary_factor must be 1.0, got {params.get('partial_rotary_factor')}")
        inv_freq = 1.0 / (rope_theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
        if rope_type == "linear":
            inv_freq = inv_freq / float(params["factor"])
        elif rope_type == "llama3":
            inv_freq = llama3_inv_freq(inv_freq, params, max_position_embeddings)
        self.head_dim = head_dim
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq.unsqueeze(0)
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
