"""Attention over one block of keys, returning its log-sum-exp too: the piece that `pieces.py` splits a
sliding window into. float32 math (float64 for float64 inputs); grouped key/value heads are repeated."""

from __future__ import annotations

import torch


def piece_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_bias: torch.Tensor | None,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """query [B, H, T, D]; key/value [B, H_kv, S, D]; key_bias [B, 1, 1, S] (0 or -inf) or None; causal: query t
    sees keys 0..t (top-left aligned). Returns (output [B, H, T, D] in query's dtype, lse [B, H, T, 1] float32 or float64).
    A query that sees no key gets output 0 and lse -inf."""
    repeat = query.shape[1] // key.shape[1]
    math = torch.promote_types(query.dtype, torch.float32)
    key, value = key.repeat_interleave(repeat, 1).to(math), value.repeat_interleave(repeat, 1).to(math)
    scores = query.to(math) @ key.transpose(-1, -2) * scale
    if key_bias is not None:
        scores = scores + key_bias.to(math)
    if causal:
        t, s = scores.shape[-2:]
        scores = scores.masked_fill(~torch.ones(t, s, dtype=torch.bool, device=scores.device).tril(), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    weights = torch.exp(scores - lse.clamp_min(torch.finfo(math).min)).nan_to_num(0.0)
    return (weights @ value).to(query.dtype), lse.to(torch.promote_types(torch.float32, math))
