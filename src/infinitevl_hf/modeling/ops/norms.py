"""The RMSNorms of the decoder: the torch definitions (`torch_*`, shared by the fused decode step's references)
and the ops the modules call, one kernel each for CUDA inference (`dispatch.cuda_inference_op`: the package's
Triton kernel, else compiled) instead of a few float32 passes over every token."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import cuda_inference_op


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2's RMSNorm: normalise in float32, cast back, then scale (in x's dtype)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def torch_add_rms_norm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """A pre-norm block's residual add and the next norm: (residual + delta, rms_norm(residual + delta))."""
    hidden = residual + delta
    return hidden, torch_rms_norm(hidden, weight, eps)


def torch_gated_rms_norm(x: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None, eps: float) -> torch.Tensor:
    """`weight * x / rms(x) * silu(gate)` over the last dim, in float32, returned in x's dtype."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    if gate is not None:
        x = x * F.silu(gate.float())
    return x.to(dtype)


rms_norm = cuda_inference_op(torch_rms_norm, "rms_norm")
add_rms_norm = cuda_inference_op(torch_add_rms_norm, "add_rms_norm")  # reads two activations, writes two
gated_rms_norm = cuda_inference_op(torch_gated_rms_norm, "gated_rms_norm")  # one kernel instead of ~9 passes
