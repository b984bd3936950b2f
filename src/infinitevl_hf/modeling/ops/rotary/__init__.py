"""The vision tower's rotary embedding on its joined qkv product: a Triton kernel for CUDA inference, the
torch definition (`reference.py`, transformers' function) otherwise (`dispatch.py` chooses)."""

from __future__ import annotations

import torch

from ..dispatch import current_device_problem, register_op, triton_available
from .reference import split_qkv, vision_rotary_qk_reference

if triton_available():
    from .triton_rotary import triton_vision_rotary_qk


def _kernel_fits(qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor) -> str | None:
    if not qkv.is_cuda:
        return "inputs are not on CUDA"
    if torch.is_grad_enabled():
        return "autograd is on"
    elsewhere = current_device_problem(qkv)
    if elsewhere is not None:
        return elsewhere
    if qkv.dim() != 2:
        return "qkv is not [tokens, 3 * heads * dim]"
    dim = qkv.shape[1] // (3 * heads)
    if qkv.shape[1] != 3 * heads * dim or dim % 2 or qkv.stride(1) != 1:
        return "the head dim is odd or qkv's last dim is strided"
    if not all(a.shape == (qkv.shape[0], dim) and a.stride(1) == 1 and a.device == qkv.device for a in (cos, sin)):
        return "cos/sin are not [tokens, dim] with unit stride on qkv's device"
    return None


_vision_rotary_qk = register_op("vision_rotary_qk", vision_rotary_qk_reference)
if triton_available():
    _vision_rotary_qk.register("triton", triton_vision_rotary_qk, _kernel_fits)


def vision_rotary_qk(qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor, fast: bool = True):
    """Rotated (query, key), each [tokens, heads, dim], of the tower's [tokens, 3 * heads * dim] qkv product;
    cos, sin [tokens, dim]."""
    return _vision_rotary_qk(qkv, heads, cos, sin, reference=not fast)


__all__ = ["split_qkv", "vision_rotary_qk", "vision_rotary_qk_reference"]
