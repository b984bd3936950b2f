"""The RMSNorms of the decoder, as plain tensor functions shared by the modules and the fused decode step."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2's RMSNorm: normalise in float32, cast back, then scale (in x's dtype)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """A pre-norm block's residual add and the next norm: (residual + delta, rms_norm(residual + delta))."""
    hidden = residual + delta
    return hidden, rms_norm(hidden, weight, eps)


def gated_rms_norm(x: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None, eps: float) -> torch.Tensor:
    """`weight * x / rms(x) * silu(gate)` over the last dim, in float32, returned in x's dtype."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    if gate is not None:
        x = x * F.silu(gate.float())
    return x.to(dtype)
