"""RMSNorm of the decoder (and, through `speed.vision`, of the vision blocks): Qwen2's RMSNorm math
(`ops.norms.rms_norm`), one kernel for inference on a GPU instead of five float32 passes, also joined
with the residual add before it (`add_then_norm`)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm

from .as_defined import calls_as_defined
from .ops.norms import add_rms_norm, rms_norm


class InfiniteVLRMSNorm(Qwen2_5_VLRMSNorm):
    """`Qwen2_5_VLRMSNorm` (same parameter) through `ops.norms.rms_norm`, one kernel for CUDA inference."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def add_then_norm(self, residual: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + delta, this norm of it) in one kernel for CUDA inference."""
        return add_rms_norm(residual, delta, self.weight, self.variance_epsilon)


def add_then_norm(norm: nn.Module, residual: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, norm(h)) for h = residual + delta: one kernel where `norm` is an `InfiniteVLRMSNorm` called as defined,
    outside autograd (`InfiniteVLRMSNorm.add_then_norm`); otherwise the add, then the norm's call (its hooks, the
    backward ones included, see h)."""
    if not torch.is_grad_enabled() and calls_as_defined(norm, InfiniteVLRMSNorm):
        return norm.add_then_norm(residual, delta)
    hidden = residual + delta
    return hidden, norm(hidden)
