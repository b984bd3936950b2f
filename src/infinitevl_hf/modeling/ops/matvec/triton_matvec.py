"""A Triton matrix-vector product for one-token decode: y = W x for x of one row, streaming W once, with
the small ops around it fused in.

GEMM libraries run a one-row product through tiles built for many rows; at batch 1 a decode step is a
chain of such products, and they reach well under the copy bandwidth (benchmarks/README.md, "Measurements
behind the code"). Here each program
owns a few output rows and streams their weights along the contiguous input dim, accumulating in
float32: a pure bandwidth kernel. The norms, gates and the short convolution between two products each
cost a launch of their own but almost no bytes, so they ride along (`reference.py` defines each):

- prologue, on x as it is read: Qwen2's RMSNorm (one extra pass over x for its mean square; x is a few
  KB), after the residual add before it where there is one (its sum written once, by the first program).
  Every program redoes it, so it must stay a few operations per element: the SiLU gates are epilogues,
  computed once per output row;
- epilogue, on each output row: bias; a depthwise causal conv + SiLU over the first channels (each
  channel's taps belong to the one program that computes the channel, so its state updates in place
  without races); the MLP's silu(gate) * up, with the program streaming a gate row and its up row side by
  side; a residual add.

Roundings to x's dtype follow the torch ops step by step. Imported only where Triton is installed.
"""

from __future__ import annotations

import torch

try:  # (transformers' remote-code import check skips try blocks: Triton stays optional)
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("the Triton matvec kernel needs Triton") from error

from ..triton_launch import Launch, cdiv, next_power_of_2
from .reference import ConvUpdate




@triton.jit
def _silu(x):
    return x * tl.sigmoid(x)


@triton.jit
def _conv_epilogue(y, rows, C0, C1, C_TOTAL, CW, CB, S0, S1, S2, HAS_CONV_BIAS: tl.constexpr, TAPS: tl.constexpr):
    """Rows below C_TOTAL are conv channels: segment 0 [0, C0), 1 [C0, C1), 2 [C1, C_TOTAL), each with its
    own state tensor [1, D_i, TAPS-1]; y holds the projection, already rounded to the output dtype."""
    is_conv = rows < C_TOTAL
    state = tl.where(rows < C0, S0 + rows * (TAPS - 1),
                     tl.where(rows < C1, S1 + (rows - C0) * (TAPS - 1), S2 + (rows - C1) * (TAPS - 1)))
    out = y * tl.load(CW + rows * TAPS + (TAPS - 1), mask=is_conv, other=0.0).to(tl.float32)
    for j in tl.static_range(TAPS - 1):
        tap = tl.load(state + j, mask=is_conv, other=0.0)
        out += tap.to(tl.float32) * tl.load(CW + rows * TAPS + j, mask=is_conv, other=0.0).to(tl.float32)
        if j > 0:
            tl.store(state + (j - 1), tap, mask=is_conv)
    tl.store(state + (TAPS - 2), y.to(S0.dtype.element_ty), mask=is_conv)
    if HAS_CONV_BIAS:
        out += tl.load(CB + rows, mask=is_conv, other=0.0).to(tl.float32)
    return tl.where(is_conv, _silu(out), y)


@triton.jit
def _load_x(X, X2, cols, col_ok, dtype, ADD_X: tl.constexpr):
    """x's block in float32; ADD_X: x + X2, rounded to the output dtype as the torch add rounds."""
    x = tl.load(X + cols, mask=col_ok, other=0.0).to(tl.float32)
    if ADD_X:
        x = (x + tl.load(X2 + cols, mask=col_ok, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
    return x


@triton.jit
def _fused_matvec_kernel(
    W, X, X2, H, Y, N, K: tl.constexpr, stride_wn, B, R, NW, eps,
    CW, CB, S0, S1, S2, C0, C1, C_TOTAL,
    RMS_NORM: tl.constexpr, ADD_X: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    GLU: tl.constexpr, CONV: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, TAPS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # ADD_X (with RMS_NORM): the input is X + X2 (a residual add before the norm), which program 0 writes to H
    dtype = Y.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    if RMS_NORM:
        squares = tl.zeros([BLOCK_K], dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            x = _load_x(X, X2, cols, cols < K, dtype, ADD_X)
            squares += x * x
        inv_rms = tl.math.rsqrt(tl.sum(squares, axis=0) / K + eps)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if GLU:  # W = [gate; up], N rows each: this program's up rows sit N rows below its gate rows
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = _load_x(X, X2, cols, col_ok, dtype, ADD_X)
        if ADD_X:
            if tl.program_id(0) == 0:
                tl.store(H + cols, x.to(dtype), mask=col_ok)
        if RMS_NORM:
            x = (x * inv_rms).to(dtype).to(tl.float32)
            x = (x * tl.load(NW + cols, mask=col_ok, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
        tile = rows[:, None] * stride_wn + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        acc += tl.load(W + tile, mask=mask, other=0.0).to(tl.float32) * x[None, :]
        if GLU:
            acc_up += tl.load(W + N * stride_wn + tile, mask=mask, other=0.0).to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(B + rows, mask=row_ok, other=0.0).to(tl.float32)
    if CONV:
        y = _conv_epilogue(y.to(dtype).to(tl.float32), rows, C0, C1, C_TOTAL, CW, CB, S0, S1, S2, HAS_CONV_BIAS, TAPS)
    if GLU:
        up = tl.sum(acc_up, axis=1).to(dtype).to(tl.float32)
        y = (_silu(y.to(dtype).to(tl.float32)).to(dtype).to(tl.float32) * up)
    if HAS_RESIDUAL:
        y = y.to(dtype).to(tl.float32) + tl.load(R + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(Y + rows, y.to(dtype), mask=row_ok)


@triton.jit
def _gated_norm_matvec_kernel(W, X, G, NW, Y, N, K: tl.constexpr, stride_wn, eps, D: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # x [K] is K / D heads of D values; each head RMS-normed over its values, times NW [D] and silu(G) in float32,
    # rounded once (the gated norm's op), then the product. BLOCK_K holds whole heads and divides K.
    dtype = Y.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    norm_w = tl.load(NW + tl.arange(0, D)).to(tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        heads = tl.reshape(tl.load(X + cols).to(tl.float32), (BLOCK_K // D, D))
        gate = tl.reshape(tl.load(G + cols).to(tl.float32), (BLOCK_K // D, D))
        inv_rms = tl.math.rsqrt(tl.sum(heads * heads, axis=1) / D + eps)
        normed = heads * inv_rms[:, None] * norm_w[None, :] * (gate * tl.sigmoid(gate))
        x = tl.reshape(normed.to(dtype).to(tl.float32), (BLOCK_K,))
        acc += tl.load(W + rows[:, None] * stride_wn + cols[None, :], mask=row_ok[:, None], other=0.0
                       ).to(tl.float32) * x[None, :]
    tl.store(Y + rows, tl.sum(acc, axis=1).to(dtype), mask=row_ok)


def gated_norm_block(k: int, head_dim: int) -> int | None:
    """The input block of `gated_norm_matvec`: whole heads, up to 1024 values, dividing k; None where the heads
    do not fit one (a head width that is not a power of two, or k not a multiple of it)."""
    if head_dim & (head_dim - 1) or k % head_dim:
        return None
    block = max(head_dim, min(1024, next_power_of_2(k)))
    while k % block:
        block //= 2
    return block if block >= head_dim else None


def gated_norm_matvec(x: torch.Tensor, gate: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                      weight: torch.Tensor) -> torch.Tensor:
    """One row x [1, K] of K / D heads, each through the gated RMSNorm (`norm_weight` [D], `gate` [1, K]), then
    through `weight` [N, K]: [1, N]. (`gated_norm_block` must have a block for K and D.)"""
    n, k = weight.shape
    head_dim = norm_weight.shape[0]
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    prepared = _PREPARED.get(("gated norm", n, k, head_dim))
    if prepared is None:
        # (the norm is redone by every program: 4 rows per program share it, as with the RMSNorm prologue)
        block_n = 4
        run = Launch(_gated_norm_matvec_kernel, D=head_dim, BLOCK_N=block_n, BLOCK_K=gated_norm_block(k, head_dim),
                     num_warps=4, num_stages=1)
        prepared = _PREPARED[("gated norm", n, k, head_dim)] = (cdiv(n, block_n),), run
    grid, run = prepared
    run(grid, weight, x, gate, norm_weight, y, n, k, weight.stride(0), eps)
    return y


# Launches kept per shape: (rows, inputs, the fused kernel's flags in `_FLAGS`' order) -> (grid, its `Launch` with those
# flags and `block_config`'s tile); ("gated norm", rows, inputs, head width) -> the gated norm kernel's.
_PREPARED: dict = {}
_FLAGS = ("RMS_NORM", "ADD_X", "HAS_BIAS", "HAS_RESIDUAL", "GLU", "CONV", "HAS_CONV_BIAS", "TAPS")


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the bytes `a` spans (contiguous) meet those of `b`'s first to last element."""
    start, end = a.data_ptr(), a.data_ptr() + a.numel() * a.element_size()
    b_start = b.data_ptr()
    b_end = b_start + (sum((size - 1) * stride for size, stride in zip(b.shape, b.stride())) + 1) * b.element_size()
    return start < b_end and b_start < end


def block_config(n: int, k: int, normed: bool) -> dict:
    """Tile of one program, chosen by timing every tile with weights streamed from DRAM
    (`benchmarks/matvec_bench.py --sweep`): many programs with a wide input block won at every decode
    shape; with the RMSNorm prologue, which each program redoes, 4 rows per program share it. (Triton's
    autotuner would time tiles on weights sitting in the 50 MB L2, and its repeated runs would shift the
    conv states.)"""
    if normed:
        return dict(BLOCK_N=4, BLOCK_K=min(2048, next_power_of_2(k)), num_warps=4, num_stages=1)
    return dict(BLOCK_N=1, BLOCK_K=min(1024, next_power_of_2(k)), num_warps=2 if k <= 4096 else 4, num_stages=1)


def fused_matvec(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    conv: ConvUpdate | None = None,
    glu: bool = False,
    residual: torch.Tensor | None = None,
    config: dict | None = None,
    out: torch.Tensor | None = None,
    x_delta: torch.Tensor | None = None,
    x_sum: torch.Tensor | None = None,
) -> torch.Tensor:
    """One row x [1, K] through `weight` [N, K] (row-major); returns [1, N], or [1, N/2] with glu=True.

    norm_weight: RMSNorm x first (eps); conv: a causal conv + SiLU over the first output channels; glu: the
    rows are [gate; up] and the output is silu(gate) * up; residual: added last. `config` overrides
    `block_config` (BLOCK_N, BLOCK_K, num_warps, num_stages). out: a contiguous [1, N] to write the result into,
    which may be `residual` (each program reads its rows of it before it writes them). x_delta (with norm_weight):
    the input is x + x_delta, rounded to x's dtype, and that sum is written to `x_sum` (a contiguous [1, K] of its
    own: every program reads x)."""
    n, k = weight.shape
    if (x_delta is None) != (x_sum is None) or (x_delta is not None and norm_weight is None):
        raise ValueError("x_delta and x_sum go together, and with norm_weight (the add before a norm)")
    if x_sum is not None and (x_sum.shape != x.shape or not x_sum.is_contiguous() or _overlap(x_sum, x)
                              or _overlap(x_sum, x_delta)):
        raise ValueError("x_sum must be a contiguous tensor shaped like x, apart from x and x_delta (every program "
                         "reads them while the first writes the sum)")
    if glu:
        if n % 2 or bias is not None or conv is not None:
            raise ValueError(f"a GLU product needs [gate; up] rows without bias or conv, got {n} rows")
        n //= 2
    y = torch.empty(1, n, dtype=x.dtype, device=x.device) if out is None else out
    if conv is not None:
        sizes = [s.shape[1] for s in conv.states]
        if len(sizes) != 3:
            raise ValueError(f"the conv epilogue takes three state segments, got {len(sizes)}")
        cw, cb, states = conv.weight, conv.bias, conv.states
        c0, c1, c_total, taps = sizes[0], sizes[0] + sizes[1], sum(sizes), cw.shape[-1]
    else:
        cw = cb = None
        states = (None, None, None)
        c0 = c1 = c_total = 0
        taps = 2
    anything = y  # a valid pointer for absent optional tensors (never read)
    args = (
        weight, x, x_delta if x_delta is not None else x, x_sum if x_sum is not None else anything, y, n, k,
        weight.stride(0),
        bias if bias is not None else anything, residual if residual is not None else anything,
        norm_weight if norm_weight is not None else anything, eps,
        cw if cw is not None else anything, cb if cb is not None else anything,
        *(s if s is not None else anything for s in states), c0, c1, c_total,
    )
    shape = (n, k, norm_weight is not None, x_delta is not None, bias is not None, residual is not None, glu,
             conv is not None, cb is not None, taps)
    prepared = _PREPARED.get(shape) if config is None else None
    if prepared is None:
        flags = dict(zip(_FLAGS, shape[2:]))
        chosen = config or block_config(n, k, norm_weight is not None)
        prepared = (cdiv(n, chosen["BLOCK_N"]),), Launch(_fused_matvec_kernel, **flags, **chosen)
        if config is None:
            if len(_PREPARED) >= 256:  # (products of ever new shapes: a benchmark's sweep)
                _PREPARED.clear()
            _PREPARED[shape] = prepared
    grid, run = prepared
    run(grid, *args)
    return y
