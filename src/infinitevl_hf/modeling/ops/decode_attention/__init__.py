"""One decode query over a ring of cached keys: a split-keys Triton kernel on CUDA, torch otherwise
(`dispatch.py` chooses)."""

from __future__ import annotations

import torch

from ..dispatch import current_device_problem, register_op, triton_available
from .reference import ring_decode_attention

if triton_available():
    from .triton_decode_attention import triton_ring_decode_attention


def _kernel_fits(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor,
                 scaling: float) -> str | None:
    if not query.is_cuda:
        return "inputs are not on CUDA"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return "gradients needed (the kernel has no backward)"
    elsewhere = current_device_problem(query)
    if elsewhere is not None:
        return elsewhere
    dim = query.shape[-1]
    if dim & (dim - 1):
        return f"the kernel needs a power-of-two head dim, got {dim}"
    if not query.is_contiguous() or key.stride(-1) != 1 or value.stride(-1) != 1 or valid.stride(-1) != 1:
        return "the query is not contiguous or a last dim is strided"
    return None


_decode_attention = register_op("decode_attention", ring_decode_attention)
if triton_available():
    _decode_attention.register("triton", triton_ring_decode_attention, _kernel_fits)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor, scaling: float,
                     fast: bool = True) -> torch.Tensor:
    """`ring_decode_attention` (query [B, H, 1, D], key/value [B, H_kv, S, D], valid [B, S] -> [B, 1, H, D]);
    the Triton kernels for CUDA tensors with a power-of-two head dim unless fast=False."""
    return _decode_attention(query, key, value, valid, scaling, reference=not fast)


__all__ = ["decode_attention", "ring_decode_attention"]
