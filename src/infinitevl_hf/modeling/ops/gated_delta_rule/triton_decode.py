"""One decode token of the gated delta rule as a single Triton kernel, gates and L2 norms included.

fla's fused recurrent kernel takes q, k, v, g and beta as separate tensors, so the gates and norms in front
of it are launches of their own; at one token their cost is launches, not bytes. Here each program owns
one (batch row, head, block of value columns): it reads the head's q and k straight from the projection
row, normalises them, computes beta and the decay from the raw a/b projections, and moves its [K, BV]
slice of the float32 state through the delta rule once. Blocks of value columns let the 2 MB state of a
layer stream through many SMs (one program per head, a whole [K, V] tile each, was far slower: benchmarks/README.md,
"Measurements behind the code"). `torch_gated_delta_rule_decode_step` (reference.py) is the definition.
"""

from __future__ import annotations

import torch

try:  # (transformers' remote-code import check skips try blocks: Triton stays optional)
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("the Triton decode-step kernel needs Triton") from error

from .reference import L2NORM_EPS


@triton.jit
def _decode_step_kernel(
    Q, K_, V_, A, B, A_log, dt_bias, S, O, row_stride, heads, scale, eps,
    D_K: tl.constexpr, D_V: tl.constexpr, BLOCK_V: tl.constexpr,
):
    block_v, row_head = tl.program_id(0), tl.program_id(1)
    row, head = row_head // heads, row_head % heads
    keys = tl.arange(0, D_K)
    values = block_v * BLOCK_V + tl.arange(0, BLOCK_V)
    q = tl.load(Q + row * row_stride + head * D_K + keys).to(tl.float32)
    k = tl.load(K_ + row * row_stride + head * D_K + keys).to(tl.float32)
    v = tl.load(V_ + row * row_stride + head * D_V + values).to(tl.float32)
    q = q * tl.math.rsqrt(tl.sum(q * q, axis=0) + eps) * scale
    k = k * tl.math.rsqrt(tl.sum(k * k, axis=0) + eps)
    b = tl.load(B + row * row_stride + head).to(tl.float32)
    beta = tl.sigmoid(b).to(B.dtype.element_ty).to(tl.float32)  # torch takes the sigmoid in b's dtype
    a = tl.load(A + row * row_stride + head).to(tl.float32) + tl.load(dt_bias + head).to(tl.float32)
    softplus = tl.where(a > 20.0, a, tl.log(1.0 + tl.exp(a)))  # F.softplus's threshold
    decay = tl.exp(-tl.exp(tl.load(A_log + head).to(tl.float32)) * softplus)

    state = S + row_head * D_K * D_V + keys[:, None] * D_V + values[None, :]
    s = tl.load(state) * decay
    err = v - tl.sum(s * k[:, None], axis=0)
    s = s + k[:, None] * (beta * err)[None, :]
    tl.store(state, s)
    o = tl.sum(s * q[:, None], axis=0)
    tl.store(O + row * heads * D_V + head * D_V + values, o.to(O.dtype.element_ty))


def triton_gated_delta_rule_decode_step(q, k, v, a, b, A_log, dt_bias, state, scale=None, block_v: int = 32):
    """The delta rule part of `torch_gated_delta_rule_decode_step` (no output norm) as one kernel. q, k, v, a
    and b are [B, ...] views with one row stride (e.g. slices of one projection output); the state must be
    contiguous."""
    batch, heads, d_k, d_v = state.shape
    scale = d_k**-0.5 if scale is None else scale
    o = torch.empty(batch, heads * d_v, dtype=v.dtype, device=v.device)
    grid = (triton.cdiv(d_v, block_v), batch * heads)
    _decode_step_kernel[grid](
        q, k, v, a, b, A_log, dt_bias, state, o, q.stride(0), heads, scale, L2NORM_EPS,
        D_K=d_k, D_V=d_v, BLOCK_V=block_v, num_warps=4,
    )
    return o
