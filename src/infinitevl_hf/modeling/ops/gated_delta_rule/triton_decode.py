"""One decode token of the gated delta rule as a single Triton kernel, gates and L2 norms included.

fla's fused recurrent kernel takes q, k, v, g and beta as separate tensors, so the gates and norms in front
of it are launches of their own; at one token their cost is launches, not bytes. Here each program owns
one (batch row, head, block of value columns): it reads the head's q and k straight from the projection
row, normalises them, computes beta and the decay from the raw a/b projections, and moves its [K, BV]
slice of the float32 state through the delta rule once. Blocks of value columns let the 2 MB state of a
layer stream through many SMs (one program per head, a whole [K, V] tile each, was far slower: benchmarks/README.md,
"Measurements behind the code"). `torch_gated_delta_rule_decode_step` (reference.py) is the definition.

The same kernel takes one token of the module path too (`triton_recurrent_one_token`: g and beta computed
by the layer, the new state written beside the old), where fla's fused recurrent kernel costs far more host
time per call than its GPU work.
"""

from __future__ import annotations

import torch

try:  # (transformers' remote-code import check skips try blocks: Triton stays optional)
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("the Triton decode-step kernel needs Triton") from error

from ..triton_elementwise import gdn_log_decay
from ..triton_launch import cdiv, launch
from .reference import L2NORM_EPS


@triton.jit
def _decode_step_kernel(
    Q, K_, V_, A, B, A_log, dt_bias, S, S_out, O,
    q_stride, k_stride, v_stride, a_stride, b_stride, heads, scale, eps,
    D_K: tl.constexpr, D_V: tl.constexpr, BLOCK_V: tl.constexpr,
    RAW_GATES: tl.constexpr, HAS_STATE: tl.constexpr, STORE_STATE: tl.constexpr, NORM_QK: tl.constexpr,
):
    # RAW_GATES: A and B are the raw a/b projections (the gates are computed here); else the log decay g and beta.
    block_v, row_head = tl.program_id(0), tl.program_id(1)
    row, head = row_head // heads, row_head % heads
    keys = tl.arange(0, D_K)
    values = block_v * BLOCK_V + tl.arange(0, BLOCK_V)
    q = tl.load(Q + row * q_stride + head * D_K + keys).to(tl.float32)
    k = tl.load(K_ + row * k_stride + head * D_K + keys).to(tl.float32)
    v = tl.load(V_ + row * v_stride + head * D_V + values).to(tl.float32)
    if NORM_QK:
        q = q * tl.math.rsqrt(tl.sum(q * q, axis=0) + eps)
        k = k * tl.math.rsqrt(tl.sum(k * k, axis=0) + eps)
    q = q * scale
    b = tl.load(B + row * b_stride + head)
    a = tl.load(A + row * a_stride + head)
    if RAW_GATES:
        beta = tl.sigmoid(b.to(tl.float32)).to(B.dtype.element_ty).to(tl.float32)  # torch takes it in b's dtype
        decay = tl.exp(gdn_log_decay(a, tl.load(dt_bias + head), tl.load(A_log + head)))
    else:
        beta = b.to(tl.float32)
        decay = tl.exp(a.to(tl.float32))

    offsets = row_head * D_K * D_V + keys[:, None] * D_V + values[None, :]
    if HAS_STATE:
        s = tl.load(S + offsets) * decay
    else:
        s = tl.zeros((D_K, BLOCK_V), dtype=tl.float32)
    err = v - tl.sum(s * k[:, None], axis=0)
    s = s + k[:, None] * (beta * err)[None, :]
    if STORE_STATE:
        tl.store(S_out + offsets, s)
    o = tl.sum(s * q[:, None], axis=0)
    tl.store(O + row * heads * D_V + head * D_V + values, o.to(O.dtype.element_ty))


def triton_gated_delta_rule_decode_step(q, k, v, a, b, A_log, dt_bias, state, scale=None, block_v: int = 32):
    """The delta rule part of `torch_gated_delta_rule_decode_step` (no output norm) as one kernel. q, k, v, a
    and b are [B, ...] views with unit last stride (e.g. slices of one projection output); the state must be
    contiguous and is updated in place."""
    batch, heads, d_k, d_v = state.shape
    scale = d_k**-0.5 if scale is None else scale
    o = torch.empty(batch, heads * d_v, dtype=v.dtype, device=v.device)
    grid = (cdiv(d_v, block_v), batch * heads)
    launch(_decode_step_kernel, grid,
        q, k, v, a, b, A_log, dt_bias, state, state, o,
        q.stride(0), k.stride(0), v.stride(0), a.stride(0), b.stride(0), heads, scale, L2NORM_EPS,
        D_K=d_k, D_V=d_v, BLOCK_V=block_v, RAW_GATES=True, HAS_STATE=True, STORE_STATE=True, NORM_QK=True,
        num_warps=4,
    )
    return o


def triton_recurrent_one_token(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, *,
                               cu_seqlens=None, use_qk_l2norm_in_kernel=False, block_v: int = 32, final_state=None):
    """`torch_fused_recurrent_gated_delta_rule` for one token (T = 1) as one kernel: q, k [B, 1, H, K], v [B, 1,
    H, V], g and beta [B, 1, H], each contiguous; the float32 state [B, H, K, V] (or None: zeros) is read, and
    the new one written to a tensor of its own, or to `final_state` (contiguous float32 [B, H, K, V]; it may be
    initial_state: each program reads its slice of the state before it writes it). Returns (o [B, 1, H, V] in
    v's dtype, final state or None). (cu_seqlens: the op's signature; the fit check sends packed sequences
    elsewhere.)"""
    if cu_seqlens is not None:
        raise ValueError("the one-token kernel does not take packed sequences (cu_seqlens)")
    batch, _, heads, d_k = q.shape
    d_v = v.shape[-1]
    scale = d_k**-0.5 if scale is None else scale
    o = torch.empty_like(v)
    final = final_state
    if final is None and output_final_state:
        final = torch.empty(batch, heads, d_k, d_v, dtype=torch.float32, device=v.device)
    grid = (cdiv(d_v, block_v), batch * heads)
    launch(_decode_step_kernel, grid,
        q, k, v, g, beta, g, g, initial_state if initial_state is not None else o, final if final is not None else o, o,
        q.stride(0), k.stride(0), v.stride(0), g.stride(0), beta.stride(0), heads, scale, L2NORM_EPS,
        D_K=d_k, D_V=d_v, BLOCK_V=block_v, RAW_GATES=False, HAS_STATE=initial_state is not None,
        STORE_STATE=final is not None, NORM_QK=use_qk_l2norm_in_kernel, num_warps=4,
    )
    return o, final
