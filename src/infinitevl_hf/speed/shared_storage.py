"""Saving parameters that are views into a shared buffer (joined or padded weights laid out for speed)."""

from __future__ import annotations

from torch import nn


def save_own_storage(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict hook of a module whose parameters were joined or padded: each is saved as a tensor of its own, since
    safetensors refuses, and accelerate's `save_model` drops, tensors that are parts of one shared buffer.
    (Live parameters, `keep_vars=True`, are left as they are.)"""
    for key in (prefix + "weight", prefix + "bias"):
        t = state_dict.get(key)
        if t is not None and not isinstance(t, nn.Parameter) and t.untyped_storage().nbytes() != t.numel() * t.element_size():
            state_dict[key] = t.clone()
