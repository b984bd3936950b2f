"""One-row matrix-vector products for decode, with the small ops around them fused in.

Each function runs the Triton kernel (`triton_matvec.py`) for one CUDA row over a single contiguous
weight, and its torch definition (`reference.py`) otherwise: other devices, several rows, tuples of
weights, or `fast=False`.
"""

from __future__ import annotations

import torch

from .reference import ConvUpdate, Weight, matvec_reference, rms_norm_matvec_reference

try:
    from .triton_matvec import fused_matvec
except ImportError:  # no Triton (CPU-only installs)
    fused_matvec = None


def matvec_available() -> bool:
    return fused_matvec is not None


def _kernel_fits(x: torch.Tensor, weight: Weight, *others: torch.Tensor | None) -> bool:
    if fused_matvec is None or not x.is_cuda or x.dim() != 2 or x.shape[0] != 1 or not isinstance(weight, torch.Tensor):
        return False
    return all(t is None or (t.is_contiguous() and t.device == x.device) for t in (x, weight, *others))


def _conv_fits(conv: ConvUpdate | None) -> bool:
    if conv is None:
        return True
    if not isinstance(conv.weight, torch.Tensor) or (conv.bias is not None and not isinstance(conv.bias, torch.Tensor)):
        return False
    return len(conv.states) == 3 and all(s.is_contiguous() for s in conv.states) and conv.weight.is_contiguous()


def matvec(x: torch.Tensor, weight: Weight, bias: Weight | None = None, residual: torch.Tensor | None = None,
           fast: bool = True) -> torch.Tensor:
    """`residual + F.linear(x, weight, bias)` (residual optional)."""
    if fast and _kernel_fits(x, weight, bias, residual):
        return fused_matvec(x, weight, bias, residual=residual)
    return matvec_reference(x, weight, bias, residual)


def rms_norm_matvec(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: Weight, bias: Weight | None = None,
                    conv: ConvUpdate | None = None, glu: bool = False, fast: bool = True) -> torch.Tensor:
    """`F.linear(rms_norm(x), weight, bias)`, then `conv` (depthwise causal conv + SiLU) over its first channels;
    glu=True: the output halves are [gate | up] and the result is silu(gate) * up."""
    if fast and _kernel_fits(x, weight, bias, norm_weight) and _conv_fits(conv):
        return fused_matvec(x, weight, bias, norm_weight=norm_weight, eps=eps, conv=conv, glu=glu)
    return rms_norm_matvec_reference(x, norm_weight, eps, weight, bias, conv, glu)


__all__ = ["ConvUpdate", "matvec", "matvec_available", "rms_norm_matvec"]
