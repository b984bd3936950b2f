"""Torch definitions of the decode matrix-vector products and what the Triton kernel fuses around them.

Each function is the op-for-op math of the module path (Qwen2's RMSNorm, the MLP's SiLU gate, the Gated
DeltaNet's short convolution and its gated output norm); the kernel in `triton_matvec.py` is tested against
them. A weight (and bias) may be a tuple of several, whose outputs are concatenated: the layout of a
layer whose projections were not joined into one buffer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..elementwise import torch_silu_glu
from ..norms import torch_gated_rms_norm, torch_rms_norm

Weight = torch.Tensor | tuple[torch.Tensor, ...]


class ConvUpdate(NamedTuple):
    """A depthwise causal conv (+ SiLU) over the first channels of a projection's output, one token at a time.

    weight: [C, W] or one [D_i, W] per segment; bias: the same layout, or None; states: one [B, D_i, W-1] per
    segment (oldest tap first, shifted in place), with sum(D_i) = C."""

    weight: Weight
    bias: Weight | None
    states: tuple[torch.Tensor, ...]


def linear(x: torch.Tensor, weight: Weight, bias: Weight | None = None) -> torch.Tensor:
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    biases = bias if bias is not None else (None,) * len(weight)
    return torch.cat([F.linear(x, w, b) for w, b in zip(weight, biases)], dim=-1)


def conv_step(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor) -> torch.Tensor:
    """One token through a depthwise causal conv + SiLU. x [B, D]; weight [D, W]; state [B, D, W-1] (oldest
    first) is shifted in place. Computes in float32 like the torch conv path; returns x's dtype."""
    window = torch.cat([state.float(), x.float()[..., None]], dim=-1)  # [B, D, W]
    y = (window * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    state.copy_(window[..., 1:].to(state.dtype))
    return F.silu(y).to(x.dtype)


def apply_conv(y: torch.Tensor, conv: ConvUpdate) -> torch.Tensor:
    """`y` with its first sum(D_i) channels replaced by their conv outputs (states updated in place)."""
    sizes = [s.shape[1] for s in conv.states]
    weights = conv.weight.split(sizes) if isinstance(conv.weight, torch.Tensor) else conv.weight
    if conv.bias is None:
        biases = (None,) * len(sizes)
    else:
        biases = conv.bias.split(sizes) if isinstance(conv.bias, torch.Tensor) else conv.bias
    parts = y.split([*sizes, y.shape[-1] - sum(sizes)], dim=-1)
    convolved = [conv_step(p, w, b, s) for p, w, b, s in zip(parts, weights, biases, conv.states)]
    return torch.cat([*convolved, parts[-1]], dim=-1)


def add_residual(y: torch.Tensor, residual: torch.Tensor | None, in_place: bool = False) -> torch.Tensor:
    """`residual + y` (y where there is no residual); in_place: written over `residual`."""
    if residual is None:
        return y
    return residual.add_(y) if in_place else residual + y


def matvec_reference(x, weight: Weight, bias: Weight | None = None, residual: torch.Tensor | None = None,
                     glu: bool = False, in_place: bool = False, conv: ConvUpdate | None = None) -> torch.Tensor:
    """`residual + linear(x, weight, bias)`; glu=True (no residual): the output halves are [gate | up] and the
    result is silu(gate) * up. in_place: the sum is written over `residual` (a decode step's hidden state, not
    read again) and returned. conv: applied to the product's first channels before the residual (no glu)."""
    y = linear(x, weight, bias)
    if conv is not None:
        y = apply_conv(y, conv)
    return add_residual(torch_silu_glu(y) if glu else y, residual, in_place)


def rms_norm_matvec_reference(x, norm_weight, eps: float, weight: Weight, bias: Weight | None = None,
                              conv: ConvUpdate | None = None, glu: bool = False) -> torch.Tensor:
    """`linear(rms_norm(x), weight, bias)`, then `conv` over its first channels; with glu=True the output
    halves are [gate | up] and the result is silu(gate) * up (the MLP's input to its down projection)."""
    y = linear(torch_rms_norm(x, norm_weight, eps), weight, bias)
    if conv is not None:
        y = apply_conv(y, conv)
    return torch_silu_glu(y) if glu else y


def add_rms_norm_matvec_reference(residual: torch.Tensor, delta: torch.Tensor, norm_weight, eps: float, weight: Weight,
                                  bias: Weight | None = None, glu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`(h, rms_norm_matvec_reference(h, ...))` for `h = residual + delta`: a pre-norm block's residual add, then
    its norm and the product after it."""
    hidden = residual + delta
    return hidden, rms_norm_matvec_reference(hidden, norm_weight, eps, weight, bias, glu=glu)


def gated_rms_norm_matvec_reference(x: torch.Tensor, gate: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                                    weight: Weight) -> torch.Tensor:
    """`linear(gated_rms_norm(x, gate), weight)` for x and gate [rows, H * D] whose D-wide heads are each normed
    (`norm_weight` [D]): a Gated DeltaNet's output norm and its output projection."""
    rows, head_dim = x.shape[0], norm_weight.shape[0]
    normed = torch_gated_rms_norm(x.reshape(rows, -1, head_dim), norm_weight, gate.reshape(rows, -1, head_dim), eps)
    return linear(normed.reshape(rows, -1), weight)
