"""Numerical ops of the Gated DeltaNet layer: torch reference everywhere, fla kernels on CUDA."""

from .backend import fla_disabled, select_backend
from .causal_conv1d import causal_conv1d, torch_causal_conv1d
from .gated_delta_rule import (
    chunk_gated_delta_rule,
    fused_recurrent_gated_delta_rule,
    l2norm,
    torch_chunk_gated_delta_rule,
    torch_fused_recurrent_gated_delta_rule,
    torch_naive_gated_delta_rule,
)


__all__ = [
    "causal_conv1d",
    "chunk_gated_delta_rule",
    "fla_disabled",
    "fused_recurrent_gated_delta_rule",
    "l2norm",
    "select_backend",
    "torch_causal_conv1d",
    "torch_chunk_gated_delta_rule",
    "torch_fused_recurrent_gated_delta_rule",
    "torch_naive_gated_delta_rule",
]
