"""The decoder's and vision tower's small elementwise ops: SiLU gates and the text rotary embedding, each the
torch definition (`torch_*`) and an op for CUDA inference (`dispatch.cuda_inference_op`: the package's Triton
kernel, else compiled)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import cuda_inference_op


def torch_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The MLP's gate: silu(gate) * up."""
    return F.silu(gate) * up


def torch_silu_glu(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` of the joined [..., gate | up] product."""
    return torch_silu_mul(*gate_up.chunk(2, dim=-1))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def torch_apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q, k [B, H, T, D]; cos, sin [B, T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


silu_mul = cuda_inference_op(torch_silu_mul, "silu_mul")
silu_glu = cuda_inference_op(torch_silu_glu, "silu_glu")
apply_rotary = cuda_inference_op(torch_apply_rotary, "apply_rotary")
