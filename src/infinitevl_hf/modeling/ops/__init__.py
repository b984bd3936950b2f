"""Numerical ops of the decoder and vision tower: torch reference everywhere, kernels where they fit
(`dispatch.py` chooses, one registry for every op)."""

from .causal_conv1d import causal_conv1d, torch_causal_conv1d
from .dispatch import fla_disabled, prefer_reference, torch_ops_forced, triton_available
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
    "prefer_reference",
    "torch_causal_conv1d",
    "torch_chunk_gated_delta_rule",
    "torch_fused_recurrent_gated_delta_rule",
    "torch_naive_gated_delta_rule",
    "torch_ops_forced",
    "triton_available",
]
