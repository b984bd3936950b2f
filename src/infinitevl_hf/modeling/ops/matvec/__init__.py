"""One-row matrix-vector products for decode: a Triton streaming kernel on CUDA, `F.linear` otherwise."""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from .triton_matvec import triton_matvec as _kernel
except ImportError:  # no Triton (CPU-only installs)
    _kernel = None


def matvec_available() -> bool:
    return _kernel is not None


def matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`; one CUDA row with a contiguous weight goes through the Triton kernel."""
    if _kernel is None or not x.is_cuda or x.dim() != 2 or x.shape[0] != 1 or not weight.is_contiguous() or not x.is_contiguous():
        return F.linear(x, weight, bias)
    return _kernel(x, weight, bias)


__all__ = ["matvec", "matvec_available"]
