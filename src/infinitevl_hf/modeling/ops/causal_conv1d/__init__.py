"""Causal conv1d dispatcher: fla's Triton kernel for CUDA prefill, the torch reference otherwise.

Decode (T == 1) always uses the torch path: it is a W-tap dot product per channel, cheaper than a
kernel launch with state re-layout.
"""

from __future__ import annotations

import torch

from ..dispatch import FLA, fla_problem, register_fla_loader, register_op
from .cuda import fla_causal_conv1d, load_fla_causal_conv1d
from .reference import torch_causal_conv1d


def _fla_fits(x, weight=None, bias=None, activation=None, initial_state=None, *args, **kwargs) -> str | None:
    if x.shape[1] == 1:
        return "one token: a W-tap dot product per channel, cheaper in torch"
    return fla_problem("causal_conv1d", x, weight, bias, initial_state)


register_fla_loader("causal_conv1d", load_fla_causal_conv1d)
_causal_conv1d = register_op("causal_conv1d", torch_causal_conv1d)
_causal_conv1d.register(FLA, fla_causal_conv1d, _fla_fits)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = "silu",
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Depthwise causal conv1d with carried state; see :func:`torch_causal_conv1d`.

    x ``[B, T, D]``, weight ``[D, W]``, bias ``[D]``, initial_state ``[N, D, W-1]`` (previous inputs,
    oldest first). Returns ``(y [B, T, D], final_state [N, D, W-1] or None)``.
    """
    return _causal_conv1d(x, weight, bias, activation, initial_state, output_final_state, cu_seqlens)


__all__ = ["causal_conv1d", "torch_causal_conv1d"]
