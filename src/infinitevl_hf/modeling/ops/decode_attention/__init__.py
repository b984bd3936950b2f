"""One decode query over a ring of cached keys: a split-keys Triton kernel on CUDA, torch otherwise."""

from __future__ import annotations

import torch

from .reference import ring_decode_attention

try:
    from .triton_decode_attention import triton_ring_decode_attention
except ImportError:  # no Triton (CPU-only installs)
    triton_ring_decode_attention = None


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor, scaling: float,
                     fast: bool = True) -> torch.Tensor:
    """`ring_decode_attention` (query [B, H, 1, D], key/value [B, H_kv, S, D], valid [B, S] -> [B, 1, H, D]);
    the Triton kernels for CUDA tensors with a power-of-two head dim when fast=True."""
    dim = query.shape[-1]
    if (
        fast
        and triton_ring_decode_attention is not None
        and query.is_cuda
        and dim & (dim - 1) == 0
        and query.is_contiguous()
        and key.stride(-1) == 1
        and value.stride(-1) == 1
        and valid.stride(-1) == 1
    ):
        return triton_ring_decode_attention(query, key, value, valid, scaling)
    return ring_decode_attention(query, key, value, valid, scaling)


__all__ = ["decode_attention", "ring_decode_attention"]
