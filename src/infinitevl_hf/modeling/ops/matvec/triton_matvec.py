"""A Triton matrix-vector product for one-token decode: y = W x for x of one row, streaming W once.

GEMM libraries run a one-row product through tiles built for many rows; at batch 1 a decode step is a
chain of such products, and they reached about half the copy bandwidth on an H200. Here each program
owns a few output rows and streams their weights along the contiguous input dim, accumulating in
float32: a pure bandwidth kernel. Imported only where Triton is installed (CUDA).
"""

from __future__ import annotations

import torch

try:  # (transformers' remote-code import check skips try blocks: Triton stays optional)
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("the Triton matvec kernel needs Triton") from error


@triton.autotune(
    configs=[
        triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w)
        for n, k, w in ((4, 512, 4), (8, 256, 4), (8, 512, 4), (8, 1024, 8), (16, 256, 4), (16, 512, 8), (32, 256, 8))
    ],
    key=["N", "K"],
)
@triton.jit
def _matvec_kernel(W, X, B, Y, N, K, stride_wn, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        w = tl.load(W + rows[:, None] * stride_wn + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        x = tl.load(X + cols, mask=col_ok, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(B + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=row_ok)


def triton_matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x [1, K] (one row) and a row-major weight [N, K]; returns [1, N]."""
    n, k = weight.shape
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _matvec_kernel[grid](weight, x, bias if bias is not None else weight, y, n, k, weight.stride(0), HAS_BIAS=bias is not None)
    return y
