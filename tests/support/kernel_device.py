"""Where the Triton kernels' tests can run: a CUDA GPU, or the CPU under Triton's
interpreter (TRITON_INTERPRET=1, set before Triton is imported)."""

from __future__ import annotations

import os

import pytest
import torch

from irminsul.kernels.materialize import triton_available


def _kernel_device() -> str | None:
    if torch.cuda.is_available() and triton_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1" and triton_available():
        return "cpu"
    return None


KERNEL_DEVICE = _kernel_device()
needs_kernel = pytest.mark.skipif(
    KERNEL_DEVICE is None,
    reason="the Triton kernel needs CUDA, or Triton installed and TRITON_INTERPRET=1 on CPU")
