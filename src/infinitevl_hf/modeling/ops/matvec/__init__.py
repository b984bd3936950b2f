"""Decode's matrix-vector products (one token per row), with the small ops around them fused in.

Each function runs the Triton kernel (`triton_matvec.py`) for one CUDA row over a single contiguous
weight, and its torch definition (`reference.py`) otherwise: other devices, tuples of weights, or
`fast=False` (`dispatch.py` chooses). Several CUDA rows take cuBLAS's product between the package's kernels: the
norm, the three convolutions (written over their channels in place) and the SiLU gate, one launch each where the
torch definition is a dozen, and the residual in the product's epilogue (a batch's decode step is then not
compiled). The residual is then rounded once, with the product, where torch rounds the product first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dispatch import cuda_here_problem, one_token_kernel_problem, register_op, triton_available
from ..elementwise import silu_glu
from ..norms import add_rms_norm, gated_rms_norm, rms_norm
from .reference import (ConvUpdate, Weight, add_residual, add_rms_norm_matvec_reference,
                        gated_rms_norm_matvec_reference, matvec_reference, rms_norm_matvec_reference)

if triton_available():
    from ..causal_conv1d.triton_step import conv1d_step3_in_place
    from .triton_matvec import fused_matvec, gated_norm_block, gated_norm_matvec


# What the kernels compute in float32 and round back to (float64 is left to torch, which keeps it).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def matvec_available() -> bool:
    return triton_available()


def _kernel_problem(x: torch.Tensor, weight: Weight, *others: torch.Tensor | None) -> str | None:
    elsewhere = cuda_here_problem(x)  # Triton launches on the current device
    if elsewhere is not None:
        return elsewhere
    if x.dim() != 2 or x.shape[0] != 1:
        return "the kernel takes one row"
    if x.dtype not in KERNEL_DTYPES:
        return f"a {x.dtype} input"
    if isinstance(weight, (tuple, list)):
        return "the weights are separate tensors"
    if not _contiguous_on(x.get_device(), x, weight, *others):
        return "a tensor is not contiguous or on another device"
    return None


def _contiguous_on(index: int, *tensors: torch.Tensor | None) -> bool:
    """Whether each of `tensors` (None aside) is contiguous and on CUDA device `index`. (The device's index, not
    `tensor.device`, which builds a device object per call; these checks run about 150 times a decode step.)"""
    for t in tensors:
        if t is not None and not (t.is_contiguous() and t.is_cuda and t.get_device() == index):
            return False
    return True


def _separate(*weights) -> bool:
    """Whether any of `weights` is a group of separate tensors (a tuple or list) rather than one tensor."""
    return any(isinstance(w, (tuple, list)) for w in weights)


def _conv_problem(conv: ConvUpdate | None, x: torch.Tensor, outputs: int) -> str | None:
    """Why the kernels cannot run `conv` over the first channels of a product of x [rows, in] into `outputs`
    channels, or None: one joined weight [C, W], three contiguous states [rows, D_i, W-1] on x's device, in x's
    dtype, C = sum(D_i) <= outputs."""
    if conv is None:
        return None
    weight, states = conv.weight, conv.states
    if isinstance(weight, (tuple, list)) or isinstance(conv.bias, (tuple, list)):
        return "the convolutions' weights are separate tensors"
    if len(states) != 3 or not weight.is_contiguous() or not all(s.is_contiguous() for s in states):
        return "the convolution states are not three contiguous tensors"
    if weight.dim() != 2:
        return "the convolution weight is not [channels, taps]"
    channels, taps = weight.shape
    if taps < 2:
        return "a convolution of one tap (the kernels keep at least one past input)"
    rows, channels_seen, index, dtype = x.shape[0], 0, x.get_device(), x.dtype
    for s in states:
        if s.dim() != 3 or s.shape[0] != rows or s.shape[2] != taps - 1:
            return "a convolution state is not [rows, channels, taps - 1]"
        channels_seen += s.shape[1]
    if channels_seen != channels or channels > outputs:
        return "the convolution states do not cover the weight's channels within the product"
    if not all(s.is_cuda and s.get_device() == index and s.dtype == dtype for s in states):
        return "a convolution state is on another device or not in x's dtype"
    return None


def _matvec_kernel(x, weight, bias=None, residual=None, glu=False, in_place=False, conv=None):
    return fused_matvec(x, weight, bias, residual=residual, glu=glu, conv=conv, out=residual if in_place else None)


def _matvec_fits(x, weight, bias=None, residual=None, glu=False, in_place=False, conv=None) -> str | None:
    if glu and (bias is not None or residual is not None or conv is not None):
        return "the kernel's GLU takes no bias, residual or convolution"
    if residual is not None and (tuple(residual.shape) != (1, weight.shape[0]) or
                                 (in_place and residual.dtype != x.dtype)):
        return "the residual is not [1, outputs] (in x's dtype, to be written over)"
    return _kernel_problem(x, weight, bias, residual) or _conv_problem(conv, x, weight.shape[0])


def _rms_norm_matvec_kernel(x, norm_weight, eps, weight, bias=None, conv=None, glu=False):
    return fused_matvec(x, weight, bias, norm_weight=norm_weight, eps=eps, conv=conv, glu=glu)


def _rms_norm_matvec_fits(x, norm_weight, eps, weight, bias=None, conv=None, glu=False) -> str | None:
    return (_kernel_problem(x, weight, bias, norm_weight) or _norm_weight_problem(x, norm_weight)
            or _conv_problem(conv, x, weight.shape[0]))


def _norm_weight_problem(x: torch.Tensor, norm_weight: torch.Tensor) -> str | None:
    # (the kernel scales in x's dtype; torch would promote to a wider norm weight's)
    return None if norm_weight.dtype == x.dtype else "the norm weight is not in x's dtype"


def _add_rms_norm_matvec_kernel(residual, delta, norm_weight, eps, weight, bias=None, glu=False):
    hidden = torch.empty_like(residual)
    return hidden, fused_matvec(residual, weight, bias, norm_weight=norm_weight, eps=eps, glu=glu, x_delta=delta,
                                x_sum=hidden)


def _delta_problem(residual: torch.Tensor, delta: torch.Tensor) -> str | None:
    if delta.shape != residual.shape or delta.dtype != residual.dtype or delta.device != residual.device:
        return "the two summands differ in shape, dtype or device"
    return None


def _add_rms_norm_matvec_fits(residual, delta, norm_weight, eps, weight, bias=None, glu=False) -> str | None:
    return (_delta_problem(residual, delta) or _kernel_problem(residual, weight, bias, norm_weight, delta)
            or _norm_weight_problem(residual, norm_weight))


def _gated_rms_norm_matvec_fits(x, gate, norm_weight, eps, weight) -> str | None:
    problem = _kernel_problem(x, weight, gate, norm_weight)
    if problem is not None:
        return problem
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate, norm_weight, weight)):
        return "gradients needed (the kernel has no backward)"
    if weight.dtype != x.dtype:
        return "the weight is not in x's dtype"
    if gate.shape != x.shape or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        return "the gate is not shaped like x, or the weight not [outputs, inputs]"
    if norm_weight.dim() != 1 or gated_norm_block(x.shape[1], norm_weight.shape[0]) is None:
        return "the heads are not of a power-of-two width dividing the inputs"
    return None


def _rows_gated_rms_norm_matvec(x, gate, norm_weight, eps, weight):
    rows, head_dim = x.shape[0], norm_weight.shape[0]
    normed = gated_rms_norm(x.reshape(rows, -1, head_dim), norm_weight, gate.reshape(rows, -1, head_dim), eps)
    return F.linear(normed.reshape(rows, -1), weight)


def _rows_gated_rms_norm_matvec_fits(x, gate, norm_weight, eps, weight) -> str | None:
    problem = _rows_problem(x, weight, None, gate, norm_weight)
    if problem is not None:
        return problem
    if gate.shape != x.shape or x.shape[1] % norm_weight.shape[0]:
        return "the gate is not shaped like x, or the heads do not divide the inputs"
    return None


def _convolve_rows(y: torch.Tensor, conv: ConvUpdate) -> torch.Tensor:
    """y [rows, N] with `conv` run over its first channels where they stand (one kernel for the three)."""
    sizes = [s.shape[1] for s in conv.states]
    biases = conv.bias.split(sizes) if conv.bias is not None else (None,) * 3
    return conv1d_step3_in_place(y, conv.weight.split(sizes), biases, conv.states)


def _rows_matvec(x, weight, bias=None, residual=None, glu=False, in_place=False, conv=None):
    if conv is not None:  # (the fit check leaves glu out)
        return add_residual(_convolve_rows(F.linear(x, weight, bias), conv), residual, in_place)
    if residual is None or glu or bias is not None:
        return matvec_reference(x, weight, bias, residual, glu, in_place)
    # the residual added in the product's epilogue: one rounding of the float32 sum, not two; in place, cuBLAS
    # reads and writes it where it stands (out of place, addmm first copies it to the output)
    return residual.addmm_(x, weight.t()) if in_place else torch.addmm(residual, x, weight.t())


def _rows_problem(x, weight, bias, *others) -> str | None:
    """What the rows path of both ops needs: one weight (and bias) tensor, the kernels' device and autograd
    conditions (not inside a graph being compiled), x [rows, features]."""
    if _separate(weight, bias):
        return "the weights are separate tensors"
    return one_token_kernel_problem(x, weight, bias, *others) or (
        "x is not [rows, features]" if x.dim() != 2 else None)


def _rows_matvec_fits(x, weight, bias=None, residual=None, glu=False, in_place=False, conv=None) -> str | None:
    problem = _rows_problem(x, weight, bias, residual)
    if problem is not None:
        return problem
    if conv is not None:
        problem = "the convolutions take no GLU" if glu else _rows_conv_problem(conv, x, weight.shape[0])
        if problem is not None:
            return problem
    if residual is not None and tuple(residual.shape) != (x.shape[0], weight.shape[0]):
        return "the residual is not [rows, outputs]"
    if residual is not None and residual.dtype != x.dtype:
        return "the residual is not in x's dtype"
    return None


def _rows_rms_norm_matvec(x, norm_weight, eps, weight, bias=None, conv=None, glu=False):
    y = F.linear(rms_norm(x, norm_weight, eps), weight, bias)
    if conv is not None:
        _convolve_rows(y, conv)
    return silu_glu(y) if glu else y


def _rows_add_rms_norm_matvec(residual, delta, norm_weight, eps, weight, bias=None, glu=False):
    hidden, normed = add_rms_norm(residual, delta, norm_weight, eps)
    y = F.linear(normed, weight, bias)
    return hidden, silu_glu(y) if glu else y


def _rows_add_rms_norm_matvec_fits(residual, delta, norm_weight, eps, weight, bias=None, glu=False) -> str | None:
    return _delta_problem(residual, delta) or _rows_problem(residual, weight, bias, norm_weight, delta)


def _rows_conv_problem(conv: ConvUpdate | None, x: torch.Tensor, outputs: int) -> str | None:
    if conv is not None and x.dtype not in KERNEL_DTYPES:
        return f"a {x.dtype} input to the convolutions"
    return _conv_problem(conv, x, outputs)


def _rows_rms_norm_matvec_fits(x, norm_weight, eps, weight, bias=None, conv=None, glu=False) -> str | None:
    return _rows_problem(x, weight, bias, norm_weight) or _rows_conv_problem(conv, x, weight.shape[0])


_matvec = register_op("matvec", matvec_reference)
_rms_norm_matvec = register_op("rms_norm_matvec", rms_norm_matvec_reference)
_add_rms_norm_matvec = register_op("add_rms_norm_matvec", add_rms_norm_matvec_reference)
_gated_rms_norm_matvec = register_op("gated_rms_norm_matvec", gated_rms_norm_matvec_reference)
if triton_available():
    _matvec.register("triton", _matvec_kernel, _matvec_fits)
    _rms_norm_matvec.register("triton", _rms_norm_matvec_kernel, _rms_norm_matvec_fits)
    _add_rms_norm_matvec.register("triton", _add_rms_norm_matvec_kernel, _add_rms_norm_matvec_fits)
    _gated_rms_norm_matvec.register("triton", gated_norm_matvec, _gated_rms_norm_matvec_fits)
    _matvec.register("rows", _rows_matvec, _rows_matvec_fits)
    _rms_norm_matvec.register("rows", _rows_rms_norm_matvec, _rows_rms_norm_matvec_fits)
    _add_rms_norm_matvec.register("rows", _rows_add_rms_norm_matvec, _rows_add_rms_norm_matvec_fits)
    _gated_rms_norm_matvec.register("rows", _rows_gated_rms_norm_matvec, _rows_gated_rms_norm_matvec_fits)


def matvec(x: torch.Tensor, weight: Weight, bias: Weight | None = None, residual: torch.Tensor | None = None,
           fast: bool = True, glu: bool = False, in_place: bool = False, conv: ConvUpdate | None = None
           ) -> torch.Tensor:
    """`residual + F.linear(x, weight, bias)` (residual optional); glu=True: the output halves are [gate | up]
    and the result is silu(gate) * up. in_place: the sum is written over `residual` and returned (a decode
    step's hidden state, which nothing reads again); not while autograd records (backward may need the old one).
    conv: a depthwise causal conv (+ SiLU) over the product's first channels, its states shifted in place (a Gated
    DeltaNet's q, k and v; not with glu)."""
    if conv is not None and glu:
        raise ValueError("matvec: a convolution over a GLU product is not defined (pass glu=False)")
    in_place = in_place and residual is not None and not torch.is_grad_enabled()
    return _matvec(x, weight, bias, residual, glu, in_place, conv, reference=not fast)


def rms_norm_matvec(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: Weight, bias: Weight | None = None,
                    conv: ConvUpdate | None = None, glu: bool = False, fast: bool = True) -> torch.Tensor:
    """`F.linear(rms_norm(x), weight, bias)`, then `conv` (depthwise causal conv + SiLU) over its first channels;
    glu=True: the output halves are [gate | up] and the result is silu(gate) * up."""
    return _rms_norm_matvec(x, norm_weight, eps, weight, bias, conv, glu, reference=not fast)


def add_rms_norm_matvec(residual: torch.Tensor, delta: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                        weight: Weight, bias: Weight | None = None, glu: bool = False, fast: bool = True
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm block's residual add, its norm and the product after it: `(h, F.linear(rms_norm(h), weight,
    bias))` for `h = residual + delta`; glu=True: the output halves are [gate | up] and the result is
    silu(gate) * up. For one CUDA row one kernel, whose first program writes h."""
    return _add_rms_norm_matvec(residual, delta, norm_weight, eps, weight, bias, glu, reference=not fast)


def gated_rms_norm_matvec(x: torch.Tensor, gate: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                          weight: torch.Tensor, fast: bool = True) -> torch.Tensor:
    """`F.linear(gated_rms_norm(x, gate), weight)` for x and gate [rows, H * D], each D-wide head normed with
    `norm_weight` [D] (a Gated DeltaNet's output norm, then its output projection). For one CUDA row one kernel,
    the norm in its prologue; several rows: the norm's kernel, then cuBLAS's product."""
    return _gated_rms_norm_matvec(x, gate, norm_weight, eps, weight, reference=not fast)


__all__ = ["KERNEL_DTYPES", "ConvUpdate", "add_rms_norm_matvec", "gated_rms_norm_matvec", "matvec", "matvec_available",
           "rms_norm_matvec"]
