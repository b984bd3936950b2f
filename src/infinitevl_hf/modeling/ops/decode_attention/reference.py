"""The torch definition of one decode query attending over a ring of cached keys (the module path's op)."""

from __future__ import annotations

import torch


def ring_decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor, scaling: float
) -> torch.Tensor:
    """One query token per row over a ring of cached keys, as two batched matmuls.

    query [B, H, 1, D]; key/value [B, H_kv, S, D]; valid [B, S]. Returns [B, 1, H, D]. The query heads of
    one key/value head are stacked as rows, so GQA needs no repeated keys; softmax runs in fp32. For a
    single query this beats the fused attention kernels, whose tiles assume many queries.
    """
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scaling  # [B, H_kv, G, S]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(probs, value).reshape(batch, 1, heads, dim)
