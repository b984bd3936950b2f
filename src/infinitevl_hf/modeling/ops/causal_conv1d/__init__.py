"""Causal conv1d dispatcher: fla's Triton kernel for CUDA prefill, the torch reference otherwise.

Decode (T == 1) on CUDA takes the package's one-token kernel (`triton_step.py`): one launch where the torch
path is a dozen; elsewhere the torch path. `causal_conv1d_group` runs several convolutions of the same rows (a
Gated DeltaNet's q, k and v): one launch for all three at one token, each through `causal_conv1d` otherwise.
"""

from __future__ import annotations

import torch

from ..dispatch import FLA, fla_problem, one_token_kernel_problem, register_fla_loader, register_op, triton_available
from ..in_place import run_state_in_place
from .cuda import fla_causal_conv1d, load_fla_causal_conv1d
from .reference import torch_causal_conv1d

if triton_available():
    from .triton_step import triton_conv1d_step, triton_conv1d_step3


def _fla_fits(x, weight=None, bias=None, activation=None, initial_state=None, *args, **kwargs) -> str | None:
    if x.shape[1] == 1:
        return "one token: fla's kernel is for prompts"
    return fla_problem("causal_conv1d", x, weight, bias, initial_state)


def _step_fits(x, weight=None, bias=None, activation=None, initial_state=None, output_final_state=False,
               cu_seqlens=None) -> str | None:
    return one_token_kernel_problem(x, weight, bias, initial_state) or _step_layout_problem(
        x, weight, activation, initial_state, cu_seqlens)


def _step_layout_problem(x, weight, activation, initial_state, cu_seqlens) -> str | None:
    """Why the one-token kernel cannot read these tensors' shapes and strides (the device checked apart), or None."""
    if x.shape[1] != 1 or cu_seqlens is not None:
        return "more than one token per row"
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"a {x.dtype} input"
    if x.stride(-1) != 1 or not weight.is_contiguous() or (initial_state is not None and not initial_state.is_contiguous()):
        return "x, the weight or the state is not contiguous"
    if activation not in ("silu", "swish", None):
        return f"activation {activation!r}"
    if weight.dim() != 2 or weight.shape[1] < 2:
        return "a convolution of one tap (the kernel keeps at least one past input)"
    return None


register_fla_loader("causal_conv1d", load_fla_causal_conv1d)
_causal_conv1d = register_op("causal_conv1d", torch_causal_conv1d)
if triton_available():
    _causal_conv1d.register("triton", triton_conv1d_step, _step_fits)
_causal_conv1d.register(FLA, fla_causal_conv1d, _fla_fits)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = "silu",
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    *,
    state_in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Depthwise causal conv1d with carried state; see :func:`torch_causal_conv1d`.

    x ``[B, T, D]``, weight ``[D, W]``, bias ``[D]``, initial_state ``[N, D, W-1]`` (previous inputs,
    oldest first). Returns ``(y [B, T, D], final_state [N, D, W-1] or None)``.

    state_in_place: with output_final_state, write the final state over initial_state where it has the final
    state's shape and dtype, and return initial_state as the final state (a cache's state then needs no copy;
    the one-token kernel writes it directly).
    """
    args = (x, weight, bias, activation, initial_state, output_final_state, cu_seqlens)
    impl = _causal_conv1d.select(*args)
    if not (state_in_place and output_final_state):
        return impl.fn(*args)
    # (the one-token kernel's fit check asked for a contiguous state)
    return run_state_in_place(impl, args, {}, initial_state, (x.shape[0], x.shape[2], weight.shape[1] - 1), x.dtype)


def _group_reference(xs, weights, biases, activation, states, output_final_state, cu_seqlens, state_in_place):
    """Each convolution through `causal_conv1d`: (outputs, final states or None)."""
    ys, finals = [], []
    for i, x in enumerate(xs):
        y, final = causal_conv1d(x, weights[i], biases[i], activation, states[i] if states is not None else None,
                                 output_final_state, cu_seqlens, state_in_place=state_in_place)
        ys.append(y)
        finals.append(final)
    return tuple(ys), (tuple(finals) if output_final_state else None)


def _group_kernel(xs, weights, biases, activation, states, output_final_state, cu_seqlens, state_in_place):
    joined = triton_conv1d_step3(xs, weights, biases, states, activation)
    return tuple(joined.split([x.shape[2] for x in xs], dim=-1)), tuple(states)


def _group_fits(xs, weights, biases, activation, states, output_final_state, cu_seqlens, state_in_place
                ) -> str | None:
    if len(xs) != 3:
        return f"the joined kernel takes three convolutions, got {len(xs)}"
    if states is None or any(s is None for s in states) or not (output_final_state and state_in_place):
        return "the joined kernel updates given states in place"
    if any(b is None for b in biases) != all(b is None for b in biases):
        return "some convolutions have a bias and some not"
    if len({w.shape[1] for w in weights}) != 1 or len({x.dtype for x in xs}) != 1:
        return "the convolutions differ in width or dtype"
    problem = one_token_kernel_problem(xs[0], *xs[1:], *weights, *biases, *states)  # once for the three
    if problem is not None:
        return problem
    for x, w, s in zip(xs, weights, states):
        problem = _step_layout_problem(x, w, activation, s, cu_seqlens)
        if problem is not None:
            return problem
        if s.shape != (x.shape[0], x.shape[2], w.shape[1] - 1) or s.dtype != x.dtype:
            return "a state is not [B, D, W-1] in x's dtype"
    return None


_group = register_op("causal_conv1d_group", _group_reference)
if triton_available():
    _group.register("triton", _group_kernel, _group_fits)


def causal_conv1d_group(
    xs: tuple[torch.Tensor, ...],
    weights: tuple[torch.Tensor, ...],
    biases: tuple[torch.Tensor | None, ...],
    activation: str | None = "silu",
    states: tuple[torch.Tensor, ...] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    *,
    state_in_place: bool = False,
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None]:
    """`causal_conv1d` over each of `xs` (inputs of the same rows) with its weight, bias and state: (outputs,
    final states or None). For three convolutions of one token, on CUDA, with their states updated in place, one
    kernel computes them all (the outputs are then views of one tensor)."""
    return _group(tuple(xs), tuple(weights), tuple(biases), activation, states, output_final_state, cu_seqlens,
                  state_in_place)


__all__ = ["causal_conv1d", "causal_conv1d_group", "torch_causal_conv1d"]
