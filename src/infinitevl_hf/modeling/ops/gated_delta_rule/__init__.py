"""Gated delta rule dispatchers: fla's kernels for CUDA tensors, the torch reference otherwise.

The signatures follow fla's ``chunk_gated_delta_rule``: the first eight arguments are positional
in fla's order; ``cu_seqlens`` and ``use_qk_l2norm_in_kernel`` are keyword-only (fla orders them
differently in its two kernels, so keywords are the only safe way to pass them).
"""

from __future__ import annotations

import torch

from ..dispatch import (
    FLA,
    cuda_here_problem,
    cuda_inference_op,
    fla_problem,
    one_token_kernel_problem,
    register_fla_loader,
    register_op,
    triton_available,
)
from ..in_place import overwritten, run_state_in_place
from ..norms import gated_rms_norm, torch_gated_rms_norm
from .cuda import fla_chunk_gated_delta_rule, fla_fused_recurrent_gated_delta_rule, load_fla_gated_delta_rule
from .reference import (
    gated_output_norm,
    l2norm,
    torch_chunk_gated_delta_rule,
    torch_fused_recurrent_gated_delta_rule,
    torch_gated_delta_rule_decode_step,
    torch_gdn_gates,
    torch_naive_gated_delta_rule,
)

if triton_available():
    from .triton_decode import triton_gated_delta_rule_decode_step, triton_recurrent_one_token


def _fla_fits(name: str):
    def fits(q, k=None, v=None, g=None, beta=None, scale=None, initial_state=None, *args, **kwargs) -> str | None:
        return fla_problem(name, q, k, v, g, beta, initial_state)

    return fits


def _one_token_fits(q, k=None, v=None, g=None, beta=None, scale=None, initial_state=None, output_final_state=False,
                    *, cu_seqlens=None, use_qk_l2norm_in_kernel=False) -> str | None:
    """Whether the package's one-token kernel serves this fused-recurrent call (the module path's decode step)."""
    problem = one_token_kernel_problem(q, k, v, g, beta, initial_state)
    if problem is not None:
        return problem
    if q.shape[1] != 1 or cu_seqlens is not None:
        return "more than one token per row"
    d_k, d_v = q.shape[-1], v.shape[-1]
    if d_k & (d_k - 1) or d_v % 32 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        return f"the kernel needs a power-of-two key dim and value dims in multiples of 32, got {d_k} and {d_v}"
    if not all(t.is_contiguous() for t in (q, k, v, g, beta)) or g.dtype != torch.float32:
        return "q, k, v, g, beta are not contiguous, or g is not float32"
    if initial_state is not None and (initial_state.dtype != torch.float32 or not initial_state.is_contiguous()):
        return "the state is not contiguous float32"
    return None


_ops = {}
for _name, _reference, _kernel in (
    ("chunk_gated_delta_rule", torch_chunk_gated_delta_rule, fla_chunk_gated_delta_rule),
    ("fused_recurrent_gated_delta_rule", torch_fused_recurrent_gated_delta_rule, fla_fused_recurrent_gated_delta_rule),
):
    register_fla_loader(_name, load_fla_gated_delta_rule)
    _ops[_name] = register_op(_name, _reference)
    if _name == "fused_recurrent_gated_delta_rule" and triton_available():  # ahead of fla: one launch, little host work
        _ops[_name].register("triton", triton_recurrent_one_token, _one_token_fits)
    _ops[_name].register(FLA, _kernel, _fla_fits(_name))


def _decode_step_fits(q, k, v, a, b, A_log, dt_bias, state, scale=None) -> str | None:
    elsewhere = cuda_here_problem(state)  # Triton launches on the current device (registered only where it imports)
    if elsewhere is not None:
        return elsewhere
    _, _, d_k, d_v = state.shape
    if state.dtype != torch.float32 or not state.is_contiguous():
        return "the state is not contiguous float32"
    if d_k & (d_k - 1) or d_v % 32:
        return f"the kernel needs a power-of-two key dim and value dims in multiples of 32, got {d_k} and {d_v}"
    if not all(t.stride(-1) == 1 for t in (q, k, v, a, b)):
        return "q, k, v, a, b are not views with unit last stride"
    return None


# (g, beta) of a layer from its raw a/b projections: one kernel for CUDA inference.
gdn_gates = cuda_inference_op(torch_gdn_gates, "gdn_gates")

_decode_step = register_op("gated_delta_rule_decode_step", torch_gated_delta_rule_decode_step)
if triton_available():
    _decode_step.register("triton", triton_gated_delta_rule_decode_step, _decode_step_fits)


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
    state_in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked gated delta rule (prefill). Dispatches to fla on CUDA, else torch.

    Args:
        q, k: ``[B, T, H, K]``. v: ``[B, T, H, V]``. g (log decay, <= 0), beta: ``[B, T, H]``.
        scale: defaults to ``K ** -0.5``.
        initial_state: float32 ``[N, H, K, V]`` (N = B, or the number of packed sequences).
        output_final_state: also return the float32 state ``[N, H, K, V]``.
        cu_seqlens: ``[N + 1]`` sequence boundaries when N sequences are packed in one row (B = 1).
        use_qk_l2norm_in_kernel: L2-normalise q and k over K first (eps 1e-6, as fla).
        state_in_place: with output_final_state, write the final state over initial_state where it has the
            final state's shape and float32 dtype, and return initial_state as the final state (a cache's state
            is then updated where it stands).

    Returns:
        ``(o [B, T, H, V] in v.dtype, final_state or None)``.
    """
    o, final = _ops["chunk_gated_delta_rule"](q, k, v, g, beta, scale, initial_state, output_final_state,
                                              cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
    return o, (overwritten(initial_state, final) if state_in_place and output_final_state else final)


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
    state_in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token gated delta rule (decode). Dispatches to fla on CUDA, else torch.

    Same arguments, shapes and returns as :func:`chunk_gated_delta_rule`. fla's kernel has no
    backward pass; use :func:`chunk_gated_delta_rule` for training.

    state_in_place: with output_final_state, write the final state over initial_state where it has the final
    state's shape and dtype (float32), and return initial_state as the final state (a cache's state then needs
    no copy; the one-token kernel writes it directly).
    """
    args = (q, k, v, g, beta, scale, initial_state, output_final_state)
    options = dict(cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
    impl = _ops["fused_recurrent_gated_delta_rule"].select(*args, **options)
    if not (state_in_place and output_final_state):
        return impl.fn(*args, **options)
    # (the one-token kernel's fit check asked for a contiguous state)
    return run_state_in_place(impl, args, options, initial_state, (q.shape[0], *q.shape[2:], v.shape[-1]), torch.float32)


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
    :func:`torch_gated_delta_rule_decode_step`): on CUDA the delta rule with its gates is one Triton kernel and
    the norm another (`norms.gated_rms_norm`; inside a compiled graph, its torch definition, which inductor
    fuses); the torch definition otherwise or with fast=False."""
    o = _decode_step(q, k, v, a, b, A_log, dt_bias, state, scale, reference=not fast)
    if gate is None:
        return o
    return gated_output_norm(o, gate, norm_weight, norm_eps, norm=gated_rms_norm if fast else torch_gated_rms_norm)


__all__ = [
    "chunk_gated_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "gated_delta_rule_decode_step",
    "gdn_gates",
    "l2norm",
    "torch_chunk_gated_delta_rule",
    "torch_fused_recurrent_gated_delta_rule",
    "torch_gated_delta_rule_decode_step",
    "torch_gdn_gates",
    "torch_naive_gated_delta_rule",
]
