"""Vision-tower attention that runs a layer's windows as batched calls instead of one call per window.

transformers' `Qwen2_5_VLVisionAttention` calls the attention function once per segment of `cu_seqlens`
(window or image) for every backend but flash-attention: 16 calls per windowed layer for a 448x448 frame,
128 for 8 frames. On a GPU those launches make the tower host-bound. Here the segments that share a length
are stacked into one batch, so a layer makes one call when all windows are equal and one per distinct length
otherwise (edge windows of images whose size is not a multiple of the window, images of different sizes).
No mask is needed, so sdpa keeps its flash/efficient kernels, and each query still sees exactly the keys of
its own segment. For inference on a GPU the rotary embedding is one Triton kernel that reads the query and key
out of the qkv product (`ops.rotary`). Flash-attention backends keep the parent's varlen path. The weights (`qkv`, `proj`) and
their checkpoint keys are the parent's.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention, eager_attention_forward
from transformers.utils.generic import is_flash_attention_requested

from ...modeling.ops.rotary import split_qkv, vision_rotary_qk


def _segments_by_length(cu_seqlens: torch.Tensor, seq_length: int) -> dict[int, torch.Tensor]:
    """{segment length: token index [segments, length] of those segments} of `cu_seqlens`. The tower passes the same tensor to every block of a kind,
    so the answer is kept on it: one host sync per tower call and kind instead of one per layer (a sync per
    layer stops the host from queueing the next layers while the GPU works)."""
    plan = getattr(cu_seqlens, "_segments_by_length", None)
    if plan is not None:
        return plan
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != seq_length:
        raise ValueError(f"cu_seqlens must run from 0 to the {seq_length} tokens, got {bounds[0]}..{bounds[-1]}")
    starts: dict[int, list[int]] = {}
    for start, end in zip(bounds, bounds[1:]):
        if end > start:
            starts.setdefault(end - start, []).append(start)
    device = cu_seqlens.device
    plan = {length: torch.tensor(s, device=device)[:, None] + torch.arange(length, device=device)
            for length, s in starts.items()}
    cu_seqlens._segments_by_length = plan
    return plan


class InfiniteVLVisionAttention(Qwen2_5_VLVisionAttention):
    """`Qwen2_5_VLVisionAttention` with the segments of `cu_seqlens` batched by length (non-flash backends)."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        max_seqlen: int | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if is_flash_attention_requested(self.config):
            return super().forward(hidden_states, cu_seqlens, position_embeddings, max_seqlen=max_seqlen, **kwargs)
        seq_length = hidden_states.shape[0]
        qkv = self.qkv(hidden_states)
        query, key = vision_rotary_qk(qkv, self.num_heads, *position_embeddings)
        value = split_qkv(qkv, self.num_heads)[2]
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            """[segments, length, heads, dim] in and out: each segment is one batch row."""
            return attention(
                self,
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                attention_mask=None,
                scaling=self.scaling,
                dropout=0.0 if not self.training else self.attention_dropout,
                is_causal=False,
                **kwargs,
            )[0]

        segments = _segments_by_length(cu_seqlens, seq_length)
        if len(segments) == 1:
            # Equal segments tile the sequence in order: a view, no gather.
            (length,) = segments
            shape = (seq_length // length, length, self.num_heads, self.head_dim)
            output = attend(query.reshape(shape), key.reshape(shape), value.reshape(shape))
        else:
            output = value.new_empty(seq_length, self.num_heads, self.head_dim)
            for index in segments.values():
                output[index] = attend(query[index], key[index], value[index])
        return self.proj(output.reshape(seq_length, -1))


def use_batched_vision_attention(visual: nn.Module) -> None:
    """Make every block of a Qwen2.5-VL vision tower use `InfiniteVLVisionAttention`. Only the class changes,
    so parameters, their names and loading/saving stay as they are."""
    for block in visual.blocks:
        if not isinstance(block.attn, Qwen2_5_VLVisionAttention):
            raise TypeError(f"expected Qwen2_5_VLVisionAttention in the vision blocks, got {type(block.attn).__name__}")
        block.attn.__class__ = InfiniteVLVisionAttention
