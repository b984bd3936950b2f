"""Causal conv1d dispatcher: fla's Triton kernel for CUDA prefill, the torch reference otherwise.

Decode (T == 1) on CUDA takes the package's one-token kernel (`triton_step.py`): one launch where the torch
path is a dozen; elsewhere the torch path.
"""

from __future__ import annotations

import torch

from ..dispatch import FLA, fla_problem, one_token_kernel_problem, register_fla_loader, register_op, triton_available
from ..in_place import run_state_in_place
from .cuda import fla_causal_conv1d, load_fla_causal_conv1d
from .reference import torch_causal_conv1d

if triton_available():
    from .triton_step import triton_conv1d_step


def _fla_fits(x, weight=None, bias=None, activation=None, initial_state=None, *args, **kwargs) -> str | None:
    if x.shape[1] == 1:
        return "one token: fla's kernel is for prompts"
    return fla_problem("causal_conv1d", x, weight, bias, initial_state)


def _step_fits(x, weight=None, bias=None, activation=None, initial_state=None, output_final_state=False,
               cu_seqlens=None) -> str | None:
    problem = one_token_kernel_problem(x, weight, bias, initial_state)
    if problem is not None:
        return problem
    if x.shape[1] != 1 or cu_seqlens is not None:
        return "more than one token per row"
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"a {x.dtype} input"
    if x.stride(-1) != 1 or not weight.is_contiguous() or (initial_state is not None and not initial_state.is_contiguous()):
        return "x, the weight or the state is not contiguous"
    if activation not in ("silu", "swish", None):
        return f"activation {activation!r}"
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


__all__ = ["causal_conv1d", "torch_causal_conv1d"]
