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
    gated_output_norm,
    l2norm,
    torch_chunk_gated_delta_rule,
    torch_fused_recurrent_gated_delta_rule,
    torch_gated_delta_rule_decode_step,
    torch_naive_gated_delta_rule,
)

try:
    from .triton_decode import triton_gated_delta_rule_decode_step
except ImportError:  # no Triton (CPU-only installs)
    triton_gated_delta_rule_decode_step = None


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


def gated_delta_rule_decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    state: torch.Tensor,
    scale: float | None = None,
    gate: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-5,
    fast: bool = True,
) -> torch.Tensor:
    """One decode token from raw activations, optionally through the gated output norm (see
    :func:`torch_gated_delta_rule_decode_step`): on CUDA the delta rule with its gates is one Triton kernel
    (the norm stays torch, which `torch.compile` fuses into one kernel); the torch definition otherwise or
    with fast=False."""
    _, _, d_k, d_v = state.shape
    inputs = (q, k, v, a, b)
    if (
        fast
        and triton_gated_delta_rule_decode_step is not None
        and state.is_cuda
        and state.dtype == torch.float32
        and state.is_contiguous()
        and d_k & (d_k - 1) == 0
        and d_v % 32 == 0
        and all(t.stride(-1) == 1 and t.stride(0) == q.stride(0) for t in inputs)
    ):
        step = triton_gated_delta_rule_decode_step
    else:
        step = torch_gated_delta_rule_decode_step
    o = step(q, k, v, a, b, A_log, dt_bias, state, scale)
    return o if gate is None else gated_output_norm(o, gate, norm_weight, norm_eps)


__all__ = [
    "chunk_gated_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "gated_delta_rule_decode_step",
    "l2norm",
    "torch_chunk_gated_delta_rule",
    "torch_fused_recurrent_gated_delta_rule",
    "torch_gated_delta_rule_decode_step",
    "torch_naive_gated_delta_rule",
]
