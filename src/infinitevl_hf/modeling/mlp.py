"""The decoder's MLP: Qwen2's SwiGLU, with `silu(gate) * up` one kernel for CUDA inference (two
bf16 passes and a temporary eagerly; over a 4K-token prefill call that is 90 MB per layer)."""

from __future__ import annotations

import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2MLP

from .joined_linear import apply_linear, calls_as_defined, project_glu


class InfiniteVLMLP(Qwen2MLP):
    """`Qwen2MLP` (same parameters) whose SiLU gate is one kernel for CUDA inference (`ops.elementwise.silu_mul`),
    and whose gate and up are one product at decode where they are laid out together (`joined_linear.project_glu`:
    for one row, one matrix-vector kernel with the gate fused in)."""

    def __init__(self, config):
        super().__init__(config)
        self.hidden_act = config.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hidden_act != "silu":
            return super().forward(x)
        return apply_linear(project_glu(x, self.gate_proj, self.up_proj), self.down_proj)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor, in_place: bool = False) -> torch.Tensor:
        """`residual + self(x)`. For one token per row outside autograd, where the call runs as defined (no hooks,
        not compiled), the MLP's math runs directly with the residual handed to the down product: for one decode row
        it is added in the matrix-vector kernel's epilogue (rounded as the two eager ops round) and, in_place, written
        over `residual`; one launch and one op fewer per layer. Otherwise the module is called and the residual
        added after it."""
        if (self.hidden_act != "silu" or x.shape[-2] != 1 or torch.is_grad_enabled()
                or not calls_as_defined(self, InfiniteVLMLP)):
            return residual + self(x)
        return apply_linear(project_glu(x, self.gate_proj, self.up_proj), self.down_proj, residual, in_place)
