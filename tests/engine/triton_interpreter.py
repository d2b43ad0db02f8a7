"""Set-up shared by the Triton kernel tests; import it before anything that imports triton.

Without a GPU the kernels run under Triton's interpreter on CPU tensors: ``TRITON_INTERPRET=1`` must be set before
triton's first import (its own library functions are wrapped at import time), which this module does. A test module
importing it is skipped where triton is not installed (it is not a project dependency on CPU machines).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton.language.standard  # noqa: E402
import triton.runtime.interpreter as triton_interpreter  # noqa: E402


def interpreted(kernel) -> bool:
    """Whether ``kernel`` runs under the interpreter: False if triton was imported (by another test module) before
    ``TRITON_INTERPRET`` was set, and then the CPU cases skip."""
    return all(
        isinstance(fn, triton_interpreter.InterpretedFunction) for fn in (kernel, triton.language.standard.zeros)
    )


def devices(kernel) -> list:
    """``cpu`` (interpreted) and ``cuda`` (``gpu`` marked) parameters for tests of ``kernel``'s module."""
    cpu = pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            not interpreted(kernel),
            reason="kernels were compiled, not interpreted (module imported before TRITON_INTERPRET)",
        ),
    )
    return [cpu, pytest.param("cuda", marks=pytest.mark.gpu)]
