"""Speed-ups of the Qwen2.5-VL vision tower, applied to a built tower from outside.

Each one swaps a transformers module for a subclass that computes the same thing faster (only `__class__`
changes: parameters, their names and checkpoint keys stay the parent's), and each is tested against the parent:
- `attention`: a layer's equal-length windows as one batched attention call instead of one call per window;
- `mlp`: the MLP's intermediate size zero-padded to a multiple of 128 (Hopper's fast matrix kernels);
- `block`: the residual add joined to the next norm, the norms compiled for inference;
- `patch_embed`: the stride-equals-kernel Conv3d patch embedding as one matrix product.
"""

from __future__ import annotations

from torch import nn

from .attention import use_batched_vision_attention
from .block import use_add_norm_vision_blocks
from .mlp import use_padded_vision_mlp
from .patch_embed import use_linear_patch_embed


def speed_up_vision_tower(visual: nn.Module) -> None:
    """Apply every vision speed-up to a Qwen2.5-VL vision tower (in place; refuses towers of other module types)."""
    use_batched_vision_attention(visual)
    use_padded_vision_mlp(visual)
    use_add_norm_vision_blocks(visual)
    use_linear_patch_embed(visual)


__all__ = ["speed_up_vision_tower", "use_batched_vision_attention", "use_add_norm_vision_blocks",
           "use_linear_patch_embed", "use_padded_vision_mlp"]
