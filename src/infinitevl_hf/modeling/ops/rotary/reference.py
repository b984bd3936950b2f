"""The vision tower's rotary embedding applied to the query and key parts of its joined qkv product."""

from __future__ import annotations

import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision


def split_qkv(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[tokens, 3 * heads * dim] -> query, key, value views, each [tokens, heads, dim]."""
    return qkv.reshape(qkv.shape[0], 3, heads, -1).unbind(1)


def vision_rotary_qk_reference(qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor):
    """Rotated (query, key), each [tokens, heads, dim], of a [tokens, 3 * heads * dim] product; cos, sin
    [tokens, dim]. transformers' `apply_rotary_pos_emb_vision`: float32 math, rounded once to the input dtype."""
    query, key, _ = split_qkv(qkv, heads)
    return apply_rotary_pos_emb_vision(query, key, cos, sin)
