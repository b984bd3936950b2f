"""Pure-torch depthwise causal conv1d (GDN's short convolution), with a carried input window.

State layout: ``[B, D, W-1]``, the previous ``W-1`` inputs, oldest first (zeros at the start).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


_ACTIVATIONS = ("silu", "swish", None)


def _check(x, weight, bias, activation, initial_state, cu_seqlens) -> int:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, D], got shape {tuple(x.shape)}")
    D = x.shape[-1]
    if weight.dim() != 2 or weight.shape[0] != D:
        raise ValueError(
            f"weight must be depthwise [D, W] with D={D}, got {tuple(weight.shape)} "
            "(squeeze dim 1 of an nn.Conv1d weight [D, 1, W])"
        )
    if bias is not None and bias.shape != (D,):
        raise ValueError(f"bias must be [D] = [{D}], got {tuple(bias.shape)}")
    if cu_seqlens is not None:
        if x.shape[0] != 1:
            raise ValueError(f"with cu_seqlens the batch size must be 1 (packed sequences), got B={x.shape[0]}")
        if cu_seqlens.dim() != 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != x.shape[1]:
            raise ValueError(f"cu_seqlens must be 1-D, start at 0 and end at T={x.shape[1]}, got {cu_seqlens.tolist()}")
        n = cu_seqlens.numel() - 1
    else:
        n = x.shape[0]
    W = weight.shape[1]
    if initial_state is not None and initial_state.shape != (n, D, W - 1):
        raise ValueError(f"initial_state must be [N, D, W-1] = [{n}, {D}, {W - 1}], got {tuple(initial_state.shape)}")
    return n


def _conv_core(x, weight, bias, activation, state):
    # x [B, T, D] (compute dtype), state [B, D, W-1] or None -> (y [B, T, D], new state [B, D, W-1])
    B, T, D = x.shape
    W = weight.shape[1]
    if state is None:
        state = x.new_zeros(B, D, W - 1)
    window = torch.cat([state.to(x.dtype), x.transpose(1, 2)], dim=-1)  # [B, D, W-1+T]
    if T == 1:
        y = (window * weight).sum(-1, keepdim=True)  # decode: one dot product per channel
        if bias is not None:
            y = y + bias[:, None]
    else:
        y = F.conv1d(window, weight.unsqueeze(1), bias, groups=D)  # exactly T outputs, no padding
    if activation is not None:
        y = F.silu(y)
    return y.transpose(1, 2), window[..., window.shape[-1] - (W - 1):]


def torch_causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = "silu",
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Depthwise causal convolution ``y[t] = act(sum_j weight[:, j] * xpad[t + j] + bias)``.

    Args:
        x: ``[B, T, D]``.
        weight: ``[D, W]`` (an ``nn.Conv1d(D, D, W, groups=D)`` weight ``[D, 1, W]`` squeezed).
        bias: ``[D]`` or None.
        activation: ``"silu"``/``"swish"`` or None.
        initial_state: ``[N, D, W-1]``, the previous W-1 inputs, oldest first; zeros when None.
        output_final_state: also return the last W-1 inputs of ``initial_state ++ x`` (``[N, D, W-1]``,
            x.dtype), correct when T < W-1 too.
        cu_seqlens: ``[N + 1]`` boundaries of sequences packed in one row (B = 1); each segment
            starts from its own state, nothing leaks across segments.

    Returns:
        ``(y [B, T, D] in x.dtype, final_state or None)``. Half-precision inputs compute in float32.
        Equals ``nn.Conv1d(D, D, W, groups=D, padding=W-1)(x^T)[..., :T]`` (+ SiLU) with no state.
    """
    _check(x, weight, bias, activation, initial_state, cu_seqlens)
    out_dtype = x.dtype
    dt = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    xc, wc = x.to(dt), weight.to(dt)
    bc = bias.to(dt) if bias is not None else None
    if cu_seqlens is None:
        y, state = _conv_core(xc, wc, bc, activation, initial_state)
    else:
        ys, states = [], []
        bounds = cu_seqlens.tolist()
        for i, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
            s0 = initial_state[i : i + 1] if initial_state is not None else None
            y_i, s_i = _conv_core(xc[:, bos:eos], wc, bc, activation, s0)
            ys.append(y_i)
            states.append(s_i)
        y, state = torch.cat(ys, dim=1), torch.cat(states, dim=0)
    return y.to(out_dtype), (state.to(out_dtype) if output_final_state else None)
