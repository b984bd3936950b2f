"""One token through the depthwise causal convolution as a single Triton kernel (the module path's decode step).

The torch definition of a one-token step is a dozen launches (casts, a concat, the W-tap product, the SiLU,
the shifted state) for a few kilobytes of work; here each program takes a block of channels of one row, reads
its W-1 carried inputs and the new one, and writes the output and the shifted state. `torch_causal_conv1d`
(reference.py) is the definition: float32 math, results in x's dtype. A Gated DeltaNet's three convolutions
(q, k, v) of one token take one launch together (`triton_conv1d_step3`).
"""

from __future__ import annotations

import torch

try:  # (transformers' remote-code import check skips try blocks: Triton stays optional)
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("the Triton conv step kernel needs Triton") from error

from ..triton_launch import cdiv, launch


@triton.jit
def _conv_channels(X, Wt, Bias, S, Y, S_out, D, x_stride, y_stride, row, block, W: tl.constexpr,
                   BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, SILU: tl.constexpr,
                   STORE_STATE: tl.constexpr):
    """One block of channels of one row: the output, and the state shifted by the new input."""
    channels = block * BLOCK_D + tl.arange(0, BLOCK_D)
    live = channels < D
    x = tl.load(X + row * x_stride + channels, mask=live, other=0.0).to(tl.float32)
    state_row = S + row * D * (W - 1) + channels * (W - 1)
    out_row = S_out + row * D * (W - 1) + channels * (W - 1)
    y = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for tap in tl.static_range(W - 1):  # the carried inputs, oldest first, then the new one: the reference's order
        if HAS_STATE:
            past = tl.load(state_row + tap, mask=live, other=0.0).to(tl.float32)
        else:
            past = tl.zeros((BLOCK_D,), dtype=tl.float32)
        y += past * tl.load(Wt + channels * W + tap, mask=live, other=0.0).to(tl.float32)
        if STORE_STATE and tap > 0:
            tl.store(out_row + tap - 1, past.to(S_out.dtype.element_ty), mask=live)
    y += x * tl.load(Wt + channels * W + (W - 1), mask=live, other=0.0).to(tl.float32)
    if STORE_STATE:
        tl.store(out_row + (W - 2), x.to(S_out.dtype.element_ty), mask=live)
    if HAS_BIAS:
        y += tl.load(Bias + channels, mask=live, other=0.0).to(tl.float32)
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(Y + row * y_stride + channels, y.to(Y.dtype.element_ty), mask=live)


@triton.jit
def _conv_step_kernel(X, Wt, Bias, S, Y, S_out, D, x_stride, W: tl.constexpr, BLOCK_D: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, SILU: tl.constexpr, STORE_STATE: tl.constexpr):
    _conv_channels(X, Wt, Bias, S, Y, S_out, D, x_stride, D, tl.program_id(0), tl.program_id(1), W, BLOCK_D,
                   HAS_BIAS, HAS_STATE, SILU, STORE_STATE)


@triton.jit
def _conv_step3_kernel(X0, X1, X2, W0, W1, W2, B0, B1, B2, S0, S1, S2, Y, D0, D1, D2, x0_stride, x1_stride, x2_stride,
                       y_stride, W: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr):
    # Three convolutions of the same rows (a Gated DeltaNet's q, k, v): the blocks of the second and third follow
    # the first's; their outputs sit side by side in Y's rows; each state is updated where it stands. Y may be
    # where the inputs are: each program reads its channels before it writes them.
    row, block = tl.program_id(0), tl.program_id(1)
    blocks0 = tl.cdiv(D0, BLOCK_D)
    blocks1 = tl.cdiv(D1, BLOCK_D)
    if block < blocks0:
        _conv_channels(X0, W0, B0, S0, Y, S0, D0, x0_stride, y_stride, row, block, W, BLOCK_D, HAS_BIAS, True,
                       SILU, True)
    elif block < blocks0 + blocks1:
        _conv_channels(X1, W1, B1, S1, Y + D0, S1, D1, x1_stride, y_stride, row, block - blocks0, W, BLOCK_D,
                       HAS_BIAS, True, SILU, True)
    else:
        _conv_channels(X2, W2, B2, S2, Y + D0 + D1, S2, D2, x2_stride, y_stride, row, block - blocks0 - blocks1, W,
                       BLOCK_D, HAS_BIAS, True, SILU, True)


def triton_conv1d_step(x, weight, bias=None, activation="silu", initial_state=None, output_final_state=False,
                       cu_seqlens=None, block_d: int = 256, final_state: torch.Tensor | None = None):
    """`torch_causal_conv1d` for one token per row: x [B, 1, D] (unit channel stride), weight [D, W] and the
    state [B, D, W-1] contiguous. Returns (y [B, 1, D], the new state [B, D, W-1] or None), both in x's dtype.
    final_state: a contiguous [B, D, W-1] tensor of x's dtype to write the new state into, which may be
    initial_state itself (each channel's carried inputs are all read before any is overwritten)."""
    batch, _, channels = x.shape
    taps = weight.shape[1]
    y = torch.empty(batch, 1, channels, dtype=x.dtype, device=x.device)
    final = final_state
    if final is None and output_final_state:
        final = torch.empty(batch, channels, taps - 1, dtype=x.dtype, device=x.device)
    grid = (batch, cdiv(channels, block_d))
    launch(_conv_step_kernel, grid,
        x, weight, bias if bias is not None else weight, initial_state if initial_state is not None else weight, y,
        final if final is not None else y, channels, x.stride(0), W=taps, BLOCK_D=block_d, HAS_BIAS=bias is not None,
        HAS_STATE=initial_state is not None, SILU=activation is not None, STORE_STATE=final is not None, num_warps=4,
    )
    return y, final


def triton_conv1d_step3(xs, weights, biases, states, activation="silu", block_d: int = 256,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """Three one-token `triton_conv1d_step`s of the same rows in one launch, each state updated in place: xs
    [B, 1, D_i] (unit channel stride), weights [D_i, W] and states [B, D_i, W-1] contiguous, biases all None or
    all given. Returns the three outputs side by side, [B, 1, D_0 + D_1 + D_2] in the first x's dtype; or writes
    them into `out` ([B, 1, >= D_0 + D_1 + D_2], unit channel stride; its first channels may be the inputs
    themselves, as `conv1d_step3_in_place` passes them) and returns it."""
    batch = xs[0].shape[0]
    sizes = [x.shape[2] for x in xs]
    y = torch.empty(batch, 1, sum(sizes), dtype=xs[0].dtype, device=xs[0].device) if out is None else out
    has_bias = biases[0] is not None
    blocks = sum(cdiv(size, block_d) for size in sizes)
    launch(_conv_step3_kernel, (batch, blocks), *xs, *weights, *(biases if has_bias else weights), *states, y,
           *sizes, *(x.stride(0) for x in xs), y.stride(0), W=weights[0].shape[1], BLOCK_D=block_d,
           HAS_BIAS=has_bias, SILU=activation is not None, num_warps=4)
    return y


def conv1d_step3_in_place(y: torch.Tensor, weights, biases, states, activation="silu") -> torch.Tensor:
    """A projection's output y [B, N] (unit last stride) with its first D_0 + D_1 + D_2 channels (the states'
    widths, in order) replaced by their one-token convolutions (+ SiLU) where they stand; returns y."""
    sizes = [s.shape[1] for s in states]
    offsets = (0, sizes[0], sizes[0] + sizes[1])
    xs = [y[:, None, o : o + d] for o, d in zip(offsets, sizes)]
    triton_conv1d_step3(xs, weights, biases, states, activation, out=y[:, None])
    return y
