"""Vision patch embedding as one matrix product.

Qwen2.5-VL embeds each flattened patch (3 channels x 2 frames x 14 x 14 pixels) with a Conv3d whose stride
equals its kernel, so every output is the dot product of one patch with one filter: a [patches, 1176] x
[1176, 1280] product. cuDNN runs that conv as an implicit-GEMM kernel many times slower than the same product
through cuBLAS (benchmarks/README.md, "Measurements behind the code"). The weight stays the conv's (same name and shape).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionPatchEmbed

from ..retype import reads_plain_weights, retype


class InfiniteVLVisionPatchEmbed(Qwen2_5_VisionPatchEmbed):
    """`Qwen2_5_VisionPatchEmbed` computed as `patches @ weight.flatten(1).T` (same parameter)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not reads_plain_weights(self.proj, nn.Conv3d):  # a LoRA or quantized conv: its own forward
            return super().forward(hidden_states)
        weight = self.proj.weight
        per_patch = weight[0].numel()
        if hidden_states.numel() % per_patch:
            raise ValueError(f"pixel values of shape {tuple(hidden_states.shape)} do not split into patches of "
                             f"{per_patch} values (channels x frames x pixels)")
        # the conv's input view is [N, C, T, P, P], the filter's [E, C, T, P, P]: both flatten in that order
        patches = hidden_states.reshape(-1, per_patch).to(weight.dtype)
        return F.linear(patches, weight.flatten(1), self.proj.bias)


def use_linear_patch_embed(visual: nn.Module) -> None:
    """Make a Qwen2.5-VL vision tower's patch embedding `InfiniteVLVisionPatchEmbed` (only the class changes)."""
    conv = getattr(visual.patch_embed, "proj", None)
    if isinstance(conv, nn.Conv3d) and (tuple(conv.stride) != tuple(conv.kernel_size) or any(p != 0 for p in conv.padding)):
        raise ValueError("the patch embedding is a matrix product only when the conv's stride equals its kernel")
    retype(visual.patch_embed, Qwen2_5_VisionPatchEmbed, InfiniteVLVisionPatchEmbed, "as the patch embedding")
