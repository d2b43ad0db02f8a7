"""When the layers take their fused Triton kernels (``engine/layers/triton_ops.py``) instead of torch ops.

Kept apart from ``triton_ops`` so that asking never imports triton: CPU code paths (and the interpreter tests,
which must set ``TRITON_INTERPRET`` before triton's first import) stay free of it.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def is_triton_importable() -> bool:
    """Whether ``import triton`` succeeds (tried once, on the first CUDA forward)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(x: torch.Tensor) -> bool:
    """Whether ops on ``x`` should run the fused Triton kernels: ``x`` is on a CUDA device and triton imports.
    The device is checked first, so CPU tensors never trigger the import."""
    return x.is_cuda and is_triton_importable()
