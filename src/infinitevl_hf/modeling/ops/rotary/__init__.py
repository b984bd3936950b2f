"""The vision tower's rotary embedding on its joined qkv product: a Triton kernel for CUDA inference, the
torch definition (`reference.py`, transformers' function) otherwise."""

from __future__ import annotations

import torch

from .reference import split_qkv, vision_rotary_qk_reference

try:
    from .triton_rotary import triton_vision_rotary_qk
except ImportError:  # no Triton (CPU-only installs)
    triton_vision_rotary_qk = None


def _kernel_fits(qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    if triton_vision_rotary_qk is None or not qkv.is_cuda or torch.is_grad_enabled() or qkv.dim() != 2:
        return False
    dim = qkv.shape[1] // (3 * heads)
    if qkv.shape[1] != 3 * heads * dim or dim % 2 or qkv.stride(1) != 1:
        return False
    return all(a.shape == (qkv.shape[0], dim) and a.stride(1) == 1 and a.device == qkv.device for a in (cos, sin))


def vision_rotary_qk(qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor, fast: bool = True):
    """Rotated (query, key), each [tokens, heads, dim], of the tower's [tokens, 3 * heads * dim] qkv product;
    cos, sin [tokens, dim]."""
    if fast and _kernel_fits(qkv, heads, cos, sin):
        return triton_vision_rotary_qk(qkv, heads, cos, sin)
    return vision_rotary_qk_reference(qkv, heads, cos, sin)


__all__ = ["split_qkv", "vision_rotary_qk", "vision_rotary_qk_reference"]
