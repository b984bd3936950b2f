"""Vision block whose residual add after attention and the MLP's norm run as one compiled kernel for inference
on a GPU (`InfiniteVLRMSNorm.add_then_norm`): over a 16-frame call that is 16,384 x 1,280 activations a block."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm, Qwen2_5_VLVisionBlock

from ...modeling.rms_norm import InfiniteVLRMSNorm
from ..retype import retype


class InfiniteVLVisionBlock(Qwen2_5_VLVisionBlock):
    """`Qwen2_5_VLVisionBlock` (same modules) with the add before `norm2` joined to it."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attended = self.attn(self.norm1(hidden_states), cu_seqlens=cu_seqlens,
                             position_embeddings=position_embeddings, **kwargs)
        hidden_states, normed = self.norm2.add_then_norm(hidden_states, attended)
        return hidden_states + self.mlp(normed)


def use_compiled_vision_norms(visual: nn.Module) -> None:
    """Make the two norms of every vision block `InfiniteVLRMSNorm` (only the class changes)."""
    for block in visual.blocks:
        for norm in (block.norm1, block.norm2):
            retype(norm, Qwen2_5_VLRMSNorm, InfiniteVLRMSNorm, "in the vision blocks")


def use_add_norm_vision_blocks(visual: nn.Module) -> None:
    """Make every block of a Qwen2.5-VL vision tower an `InfiniteVLVisionBlock` with `InfiniteVLRMSNorm`s (only
    the classes change)."""
    use_compiled_vision_norms(visual)
    for block in visual.blocks:
        retype(block, Qwen2_5_VLVisionBlock, InfiniteVLVisionBlock, "as the vision blocks")
