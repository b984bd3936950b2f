"""Vision-tower attention that runs a layer's windows as batched calls instead of one call per window.

transformers' `Qwen2_5_VLVisionAttention` calls the attention function once per segment of `cu_seqlens`
(window or image) for every backend but flash-attention: 16 calls per windowed layer for a 448x448 frame,
128 for 8 frames. On a GPU those launches make the tower host-bound. Here the segments that share a length
are stacked into one batch, so a layer makes one call when all windows are equal and one per distinct length
otherwise (edge windows of images whose size is not a multiple of the window, images of different sizes).
No mask is needed, so sdpa keeps its flash/efficient kernels, and each query still sees exactly the keys of
its own segment. Flash-attention backends keep the parent's varlen path. The weights (`qkv`, `proj`) and
their checkpoint keys are the parent's.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLVisionAttention,
    apply_rotary_pos_emb_vision,
    eager_attention_forward,
)
from transformers.utils.generic import is_flash_attention_requested


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
        query, key, value = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).unbind(1)
        query, key = apply_rotary_pos_emb_vision(query, key, *position_embeddings)
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

        bounds = cu_seqlens.tolist()  # one host sync per layer, as in the parent's split
        if bounds[0] != 0 or bounds[-1] != seq_length:
            raise ValueError(f"cu_seqlens must run from 0 to the {seq_length} tokens, got {bounds[0]}..{bounds[-1]}")
        starts_by_length: dict[int, list[int]] = {}
        for start, end in zip(bounds, bounds[1:]):
            if end > start:
                starts_by_length.setdefault(end - start, []).append(start)

        if len(starts_by_length) == 1:
            # Equal segments tile the sequence in order: a view, no gather.
            (length,) = starts_by_length
            shape = (seq_length // length, length, self.num_heads, self.head_dim)
            output = attend(query.reshape(shape), key.reshape(shape), value.reshape(shape))
        else:
            output = value.new_empty(seq_length, self.num_heads, self.head_dim)
            for length, starts in starts_by_length.items():
                index = torch.tensor(starts, device=hidden_states.device)[:, None] + torch.arange(
                    length, device=hidden_states.device
                )
                output[index] = attend(query[index], key[index], value[index])
        return self.proj(output.reshape(seq_length, -1))


def use_batched_vision_attention(visual: nn.Module) -> None:
    """Make every block of a Qwen2.5-VL vision tower use `InfiniteVLVisionAttention`. Only the class changes,
    so parameters, their names and loading/saving stay as they are."""
    for block in visual.blocks:
        if not isinstance(block.attn, Qwen2_5_VLVisionAttention):
            raise TypeError(f"expected Qwen2_5_VLVisionAttention in the vision blocks, got {type(block.attn).__name__}")
        block.attn.__class__ = InfiniteVLVisionAttention
