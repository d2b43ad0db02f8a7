"""RMSNorm, with an optional fused residual add."""

import torch
from torch import nn

from engine.layers.triton_dispatch import use_triton


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in float32 and cast back (as transformers does).

    ``forward(x)`` returns the normalized ``[T, hidden]``; ``forward(x, residual)`` first adds
    ``residual`` and returns ``(normalized, x + residual)`` so the decoder layer keeps one
    running residual stream.

    On CUDA (with triton) either form is one fused kernel (``triton_ops.rms_norm`` / ``fused_add_rms_norm``) with
    the same rounding steps; the torch code below is ~9 kernels.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        # The kernels write x's dtype; a weight of another dtype keeps torch's type promotion.
        if use_triton(x) and self.weight.dtype == x.dtype:
            from engine.layers import triton_ops

            if residual is None:
                return triton_ops.rms_norm(x, self.weight, self.eps)
            return triton_ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
