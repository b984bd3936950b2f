"""One-row matrix-vector products for decode, with the small ops around them fused in.

Each function runs the Triton kernel (`triton_matvec.py`) for one CUDA row over a single contiguous
weight, and its torch definition (`reference.py`) otherwise: other devices, several rows, tuples of
weights, or `fast=False` (`dispatch.py` chooses).
"""

from __future__ import annotations

import torch

from ..dispatch import cuda_here_problem, register_op, triton_available
from .reference import ConvUpdate, Weight, matvec_reference, rms_norm_matvec_reference

if triton_available():
    from .triton_matvec import fused_matvec


def matvec_available() -> bool:
    return triton_available()


def _kernel_problem(x: torch.Tensor, weight: Weight, *others: torch.Tensor | None) -> str | None:
    elsewhere = cuda_here_problem(x)  # Triton launches on the current device
    if elsewhere is not None:
        return elsewhere
    if x.dim() != 2 or x.shape[0] != 1:
        return "the kernel takes one row"
    if not isinstance(weight, torch.Tensor):
        return "the weights are separate tensors"
    if not all(t is None or (t.is_contiguous() and t.device == x.device) for t in (x, weight, *others)):
        return "a tensor is not contiguous or on another device"
    return None


def _conv_problem(conv: ConvUpdate | None) -> str | None:
    if conv is None:
        return None
    if not isinstance(conv.weight, torch.Tensor) or (conv.bias is not None and not isinstance(conv.bias, torch.Tensor)):
        return "the convolutions' weights are separate tensors"
    if len(conv.states) != 3 or not all(s.is_contiguous() for s in conv.states) or not conv.weight.is_contiguous():
        return "the convolution states are not three contiguous tensors"
    return None


def _matvec_kernel(x, weight, bias=None, residual=None, glu=False):
    return fused_matvec(x, weight, bias, residual=residual, glu=glu)


def _matvec_fits(x, weight, bias=None, residual=None, glu=False) -> str | None:
    if glu and (bias is not None or residual is not None):
        return "the kernel's GLU takes no bias or residual"
    return _kernel_problem(x, weight, bias, residual)


def _rms_norm_matvec_kernel(x, norm_weight, eps, weight, bias=None, conv=None, glu=False):
    return fused_matvec(x, weight, bias, norm_weight=norm_weight, eps=eps, conv=conv, glu=glu)


def _rms_norm_matvec_fits(x, norm_weight, eps, weight, bias=None, conv=None, glu=False) -> str | None:
    return _kernel_problem(x, weight, bias, norm_weight) or _conv_problem(conv)


_matvec = register_op("matvec", matvec_reference)
_rms_norm_matvec = register_op("rms_norm_matvec", rms_norm_matvec_reference)
if triton_available():
    _matvec.register("triton", _matvec_kernel, _matvec_fits)
    _rms_norm_matvec.register("triton", _rms_norm_matvec_kernel, _rms_norm_matvec_fits)


def matvec(x: torch.Tensor, weight: Weight, bias: Weight | None = None, residual: torch.Tensor | None = None,
           fast: bool = True, glu: bool = False) -> torch.Tensor:
    """`residual + F.linear(x, weight, bias)` (residual optional); glu=True: the output halves are [gate | up]
    and the result is silu(gate) * up."""
    return _matvec(x, weight, bias, residual, glu, reference=not fast)


def rms_norm_matvec(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: Weight, bias: Weight | None = None,
                    conv: ConvUpdate | None = None, glu: bool = False, fast: bool = True) -> torch.Tensor:
    """`F.linear(rms_norm(x), weight, bias)`, then `conv` (depthwise causal conv + SiLU) over its first channels;
    glu=True: the output halves are [gate | up] and the result is silu(gate) * up."""
    return _rms_norm_matvec(x, norm_weight, eps, weight, bias, conv, glu, reference=not fast)


__all__ = ["ConvUpdate", "matvec", "matvec_available", "rms_norm_matvec"]
