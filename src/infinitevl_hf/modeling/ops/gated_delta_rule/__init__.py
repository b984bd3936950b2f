"""Gated delta rule dispatchers: fla's kernels for CUDA tensors, the torch reference otherwise.

The signatures follow fla's ``chunk_gated_delta_rule``: the first eight arguments are positional
in fla's order; ``cu_seqlens`` and ``use_qk_l2norm_in_kernel`` are keyword-only (fla orders them
differently in its two kernels, so keywords are the only safe way to pass them).
"""

from __future__ import annotations

import torch

from ..backend import FLA, register_fla_op, select_backend
from .cuda import fla_chunk_gated_delta_rule, fla_fused_recurrent_gated_delta_rule, load_fla_gated_delta_rule
from .reference import (
    l2norm,
    torch_chunk_gated_delta_rule,
    torch_fused_recurrent_gated_delta_rule,
    torch_naive_gated_delta_rule,
)


register_fla_op("chunk_gated_delta_rule", load_fla_gated_delta_rule)
register_fla_op("fused_recurrent_gated_delta_rule", load_fla_gated_delta_rule)


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    *,
    cu_seqlens: torch.LongTensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked gated delta rule (prefill). Dispatches to fla on CUDA, else torch.

    Args:
        q, k: ``[B, T, H, K]``. v: ``[B, T, H, V]``. g (log decay, <= 0), beta: ``[B, T, H]``.
        scale: defaults to ``K ** -0.5``.
        initial_state: float32 ``[N, H, K, V]`` (N = B, or the number of packed sequences).
        output_final_state: also return the float32 state ``[N, H, K, V]``.
        cu_seqlens: ``[N + 1]`` sequence boundaries when N sequences are packed in one row (B = 1).
        use_qk_l2norm_in_kernel: L2-normalise q and k over K first (eps 1e-6, as fla).

    Returns:
        ``(o [B, T, H, V] in v.dtype, final_state or None)``.
    """
    fn = fla_chunk_gated_delta_rule if select_backend(
        "chunk_gated_delta_rule", q, k, v, g, beta, initial_state) == FLA else torch_chunk_gated_delta_rule
    return fn(q, k, v, g, beta, scale, initial_state, output_final_state,
              cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    *,
    cu_seqlens: torch.LongTensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token gated delta rule (decode). Dispatches to fla on CUDA, else torch.

    Same arguments, shapes and returns as :func:`chunk_gated_delta_rule`. fla's kernel has no
    backward pass; use :func:`chunk_gated_delta_rule` for training.
    """
    fn = fla_fused_recurrent_gated_delta_rule if select_backend(
        "fused_recurrent_gated_delta_rule", q, k, v, g, beta, initial_state
    ) == FLA else torch_fused_recurrent_gated_delta_rule
    return fn(q, k, v, g, beta, scale, initial_state, output_final_state,
              cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)


__all__ = [
    "chunk_gated_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "l2norm",
    "torch_chunk_gated_delta_rule",
    "torch_fused_recurrent_gated_delta_rule",
    "torch_naive_gated_delta_rule",
]
