"""Swap a transformers module for this package's subclass of it in place: only `__class__` changes, so the
parameters, their names and loading/saving stay as they are."""

from __future__ import annotations

import torch
from torch import nn


def retype(module: nn.Module, parent: type, replacement: type, where: str) -> None:
    """Make `module`, a `parent` (or already a `replacement`), a `replacement`; refuse any other module."""
    if type(module) not in (parent, replacement):
        raise TypeError(f"expected {parent.__name__} {where}, got {type(module).__name__}")
    module.__class__ = replacement


def reads_plain_weights(module: nn.Module, kind: type[nn.Module]) -> bool:
    """Whether `module` is exactly a `kind` without hooks whose own parameters are ordinary floating-point tensors
    holding data, so that a speed-up reading its weights directly computes what its forward would. A LoRA wrapper
    (whose forward adds the adapter), quantized weights (torchao's tensor subclasses, bitsandbytes' int8 data),
    forward hooks and offloaded (meta) weights need the module's own forward."""
    if type(module) is not kind or module._forward_hooks or module._forward_pre_hooks or "_hf_hook" in vars(module):
        return False
    return all(type(p.data) is torch.Tensor and p.is_floating_point() and not p.is_meta
               for p in module.parameters(recurse=False))
