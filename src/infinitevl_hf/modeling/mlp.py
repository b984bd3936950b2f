"""The decoder's MLP: Qwen2's SwiGLU, with `silu(gate) * up` one kernel for CUDA inference (two
bf16 passes and a temporary eagerly; over a 4K-token prefill call that is 90 MB per layer)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2MLP

from .as_defined import calls_as_defined
from .joined_linear import apply_linear, joined_weight, norm_parameters, project_glu
from .ops.matvec import add_rms_norm_matvec
from .rms_norm import InfiniteVLRMSNorm, add_then_norm


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

    def add_normed_to(self, residual: torch.Tensor, delta: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """`h + self(norm(h))` for `h = residual + delta`: the second half of a pre-norm block, the result written
        over h. For one token per row outside autograd and autocast, where the MLP and the norm run as defined and
        gate/up are laid out together without biases, the add, the norm and the gated product are one op (for one
        CUDA row one kernel: `ops.matvec.add_rms_norm_matvec`), then the down product with h added in it (as in
        `add_to`): two launches where there were three. Otherwise h and its norm come from
        `rms_norm.add_then_norm` (one kernel, or the norm called: then h is not written over) and go through
        `add_to`."""
        fused = self._fused_gate_up(residual, delta, norm)
        if fused is None:
            hidden, normed = add_then_norm(norm, residual, delta)
            # (a norm called as a module may have handed h to its hooks, which may keep it: then not written over)
            return self.add_to(hidden, normed, in_place=calls_as_defined(norm, InfiniteVLRMSNorm))
        (norm_weight, eps), gate_up = fused
        shape = residual.shape
        hidden, act = add_rms_norm_matvec(residual.reshape(-1, shape[-1]), delta.reshape(-1, shape[-1]), norm_weight,
                                          eps, gate_up, glu=True)
        return apply_linear(act.view(*shape[:-1], -1), self.down_proj, hidden.view(shape), in_place=True)

    def _fused_gate_up(self, residual: torch.Tensor, delta: torch.Tensor, norm: nn.Module):
        """((norm weight, eps), joined gate/up weight) where `add_normed_to` may run as one op, else None."""
        if (self.hidden_act != "silu" or delta.shape[-2] != 1 or residual.shape != delta.shape
                or residual.dtype != delta.dtype or torch.is_grad_enabled()
                or torch.is_autocast_enabled(delta.device.type) or not calls_as_defined(self, InfiniteVLMLP)
                or self.gate_proj.out_features != self.up_proj.out_features):
            return None
        parameters = norm_parameters(norm)
        joined = joined_weight((self.gate_proj, self.up_proj)) if parameters is not None else None
        if joined is None or joined[1] is not None:
            return None
        return parameters, joined[0]
