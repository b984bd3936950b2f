"""cuDNN's fused attention for one piece of a sliding window (dense or causal, optionally a per-key bias),
with its log-sum-exp. Through torch's `_scaled_dot_product_cudnn_attention`: public sdpa does not return the
log-sum-exp, and the pieces must be merged by it. Grouped key/value heads are taken as they are."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=8)
def cudnn_attention_usable(device: torch.device) -> bool:
    """cuDNN fused attention: cuDNN 9 or later on an Ampere-or-newer GPU, with torch's cuDNN sdpa enabled."""
    if device.type != "cuda" or not torch.backends.cudnn.is_available() or not torch.backends.cuda.cudnn_sdp_enabled():
        return False
    version = torch.backends.cudnn.version() or 0
    return version >= 90000 and torch.cuda.get_device_capability(device) >= (8, 0)


def cudnn_piece_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_bias: torch.Tensor | None,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See `reference.piece_attention_reference` (same arguments and results; bf16/fp16 inputs)."""
    bias = None
    if key_bias is not None:
        batch, heads, length = query.shape[0], query.shape[1], query.shape[2]
        bias = key_bias.to(query.dtype).expand(batch, heads, length, key.shape[2])
    output, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        query, key, value, bias, True, 0.0, causal, False, scale=scale
    )[:2]
    return output, lse.reshape(*query.shape[:3], 1)
