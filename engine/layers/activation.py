"""Gated activation of the Llama MLP."""

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.triton_dispatch import use_triton


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` where the input is ``[..., 2 * d]`` = ``[gate | up]``; returns ``[..., d]``.
    One fused kernel on CUDA (``triton_ops.silu_and_mul``), two torch kernels elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(x):
            from engine.layers import triton_ops

            return triton_ops.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
