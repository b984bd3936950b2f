"""The decoder's norms, SiLU gates, text rotary and Gated DeltaNet gates as one Triton kernel each, for CUDA
inference.

Each kernel computes its torch definition (`norms.torch_*`, `elementwise.torch_*`) in float32 with the
definition's explicit casts (RMSNorm casts back before its scale), rounding once at the end where eager torch
rounds after each half-precision op (as `torch.compile` does; tests hold both as close to float32). At one
decode token their cost is launches, so a plain kernel launch (no guard checks or wrappers around it) is what
keeps the module path's decode step off the host; on a prompt they stream each row once. Inputs may have any
strides (a row that is not unit-stride is copied first).
"""

from __future__ import annotations

import torch

from .dispatch import cuda_inference_problem, current_cuda_device, current_device_problem

try:  # (transformers' remote-code import check skips try blocks: Triton stays optional)
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("the Triton elementwise kernels need Triton") from error

from .triton_launch import cdiv, launch, next_power_of_2

MAX_FEATURES = 16384  # a whole row per program up to this width


def _warps(block: int) -> int:
    return 1 if block <= 256 else 4 if block <= 2048 else 8


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, features] without a copy where its layout allows, else a contiguous copy."""
    return x.reshape(-1, x.shape[-1]) if x.stride(-1) == 1 else x.contiguous().view(-1, x.shape[-1])


@triton.jit
def _rms_norm_kernel(X, R, W, Y, H, x_stride, r_stride, D, eps, BLOCK: tl.constexpr, ADD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    live = cols < D
    x = tl.load(X + row * x_stride + cols, mask=live, other=0.0)
    if ADD:  # the residual add, rounded to its dtype, is what gets normalised
        x = (x.to(tl.float32) + tl.load(R + row * r_stride + cols, mask=live, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
        tl.store(H + row * D + cols, x, mask=live)
    xf = x.to(tl.float32)
    normed = (xf * tl.math.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)).to(x.dtype)  # cast back before the scale
    w = tl.load(W + cols, mask=live, other=0.0).to(tl.float32)
    tl.store(Y + row * D + cols, (normed.to(tl.float32) * w).to(Y.dtype.element_ty), mask=live)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`norms.torch_rms_norm` as one kernel."""
    rows = _rows(x)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    block = next_power_of_2(x.shape[-1])
    launch(_rms_norm_kernel, (rows.shape[0],), rows, rows, weight, out, out, rows.stride(0), 0, x.shape[-1], eps,
           BLOCK=block, ADD=False, num_warps=_warps(block))
    return out


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """`norms.torch_add_rms_norm` as one kernel: (residual + delta, its norm)."""
    if residual.shape != delta.shape:
        residual, delta = torch.broadcast_tensors(residual, delta)
    a, b = _rows(residual), _rows(delta)
    hidden = torch.empty(residual.shape, dtype=torch.promote_types(residual.dtype, delta.dtype), device=residual.device)
    out = torch.empty(residual.shape, dtype=torch.promote_types(weight.dtype, hidden.dtype), device=residual.device)
    block = next_power_of_2(residual.shape[-1])
    launch(_rms_norm_kernel, (a.shape[0],), a, b, weight, out, hidden, a.stride(0), b.stride(0), residual.shape[-1],
           eps, BLOCK=block, ADD=True, num_warps=_warps(block))
    return hidden, out


@triton.jit
def _gated_rms_norm_kernel(X, G, W, Y, x_stride, g_outer, g_inner, g_inner_rows, D, eps, BLOCK: tl.constexpr,
                           GATE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    live = cols < D
    x = tl.load(X + row * x_stride + cols, mask=live, other=0.0).to(tl.float32)
    y = x * tl.math.rsqrt(tl.sum(x * x, axis=0) / D + eps) * tl.load(W + cols, mask=live, other=0.0).to(tl.float32)
    if GATE:  # gate row `row` sits at (row // g_inner_rows) * g_outer + (row % g_inner_rows) * g_inner
        g = tl.load(G + (row // g_inner_rows) * g_outer + (row % g_inner_rows) * g_inner + cols, mask=live,
                    other=0.0).to(tl.float32)
        y = y * (g * tl.sigmoid(g))
    tl.store(Y + row * D + cols, y.to(Y.dtype.element_ty), mask=live)


def _gate_rows(gate: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """The gate's rows as (tensor, outer stride, inner stride, rows per outer step) without a copy where a
    [..., H, D] gate with unit last stride allows it (the heads of a batch's rows slicing one projection output,
    whose rows are further apart than H * D), else a contiguous copy."""
    if gate.dim() >= 3 and gate.stride(-1) == 1:
        try:
            three = gate.view(-1, *gate.shape[-2:])
        except RuntimeError:  # the dims before the heads do not merge
            pass
        else:
            return three, three.stride(0), three.stride(1), three.shape[1]
    rows = _rows(gate)
    return rows, rows.stride(0), 0, 1


def gated_rms_norm(x: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None, eps: float) -> torch.Tensor:
    """`norms.torch_gated_rms_norm` as one kernel."""
    rows = _rows(x)
    gates, g_outer, g_inner, g_inner_rows = _gate_rows(gate.expand(x.shape)) if gate is not None else (rows, 0, 0, 1)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block = next_power_of_2(x.shape[-1])
    launch(_gated_rms_norm_kernel, (rows.shape[0],), rows, gates, weight, out, rows.stride(0), g_outer, g_inner,
           g_inner_rows, x.shape[-1], eps, BLOCK=block, GATE=gate is not None, num_warps=_warps(block))
    return out


@triton.jit
def _silu_mul_kernel(G, U, Y, g_stride, u_stride, N, BLOCK: tl.constexpr):
    row, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    live = cols < N
    g = tl.load(G + row * g_stride + cols, mask=live, other=0.0)
    u = tl.load(U + row * u_stride + cols, mask=live, other=0.0)
    gf = g.to(tl.float32)
    tl.store(Y + row * N + cols, (gf * tl.sigmoid(gf) * u.to(tl.float32)).to(Y.dtype.element_ty), mask=live)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`elementwise.torch_silu_mul` as one kernel."""
    if gate.shape != up.shape:
        gate, up = torch.broadcast_tensors(gate, up)
    g, u = _rows(gate), _rows(up)
    return _silu_mul(g, u, gate.shape, torch.promote_types(gate.dtype, up.dtype))


def silu_glu(gate_up: torch.Tensor) -> torch.Tensor:
    """`elementwise.torch_silu_glu` as one kernel: the halves of the last dim are gate and up."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"silu_glu needs an even last dim ([gate | up]), got {gate_up.shape[-1]}")
    rows, half = _rows(gate_up), gate_up.shape[-1] // 2
    return _silu_mul(rows[:, :half], rows[:, half:], (*gate_up.shape[:-1], half), gate_up.dtype)


def _silu_mul(g, u, shape, dtype):
    out = torch.empty(shape, dtype=dtype, device=g.device)
    n = g.shape[-1]
    block = min(1024, next_power_of_2(n))
    launch(_silu_mul_kernel, (g.shape[0], cdiv(n, block)), g, u, out, g.stride(0), u.stride(0), n,
           BLOCK=block, num_warps=_warps(block))
    return out


@triton.jit
def _rotate_head(X, C, S, Y, b, t, head, x_b, x_h, x_t, c_b, c_t, s_b, s_t, y_b, y_h, y_t, HALF: tl.constexpr,
                 BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    live = cols < HALF
    x = X + b * x_b + head * x_h + t * x_t
    x1 = tl.load(x + cols, mask=live, other=0.0).to(tl.float32)
    x2 = tl.load(x + HALF + cols, mask=live, other=0.0).to(tl.float32)
    c1 = tl.load(C + b * c_b + t * c_t + cols, mask=live, other=0.0).to(tl.float32)
    c2 = tl.load(C + b * c_b + t * c_t + HALF + cols, mask=live, other=0.0).to(tl.float32)
    s1 = tl.load(S + b * s_b + t * s_t + cols, mask=live, other=0.0).to(tl.float32)
    s2 = tl.load(S + b * s_b + t * s_t + HALF + cols, mask=live, other=0.0).to(tl.float32)
    y = Y + b * y_b + head * y_h + t * y_t
    tl.store(y + cols, (x1 * c1 - x2 * s1).to(Y.dtype.element_ty), mask=live)
    tl.store(y + HALF + cols, (x2 * c2 + x1 * s2).to(Y.dtype.element_ty), mask=live)


@triton.jit
def _rotary_kernel(Q, K, C, S, QO, KO, q_heads, length, q_b, q_h, q_t, k_b, k_h, k_t, c_b, c_t, s_b, s_t,
                   qo_b, qo_h, qo_t, ko_b, ko_h, ko_t, HALF: tl.constexpr, BLOCK: tl.constexpr):
    # One program per (row and position, head); the key heads follow the query heads.
    bt, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
    b, t = bt // length, bt % length
    if head < q_heads:
        _rotate_head(Q, C, S, QO, b, t, head, q_b, q_h, q_t, c_b, c_t, s_b, s_t, qo_b, qo_h, qo_t, HALF, BLOCK)
    else:
        _rotate_head(K, C, S, KO, b, t, head - q_heads, k_b, k_h, k_t, c_b, c_t, s_b, s_t, ko_b, ko_h, ko_t, HALF,
                     BLOCK)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """`elementwise.torch_apply_rotary` (q, k [B, H, T, D]; cos, sin [B, T, D]) as one kernel for both."""
    q, k, cos, sin = _unit_rows(q), _unit_rows(k), _unit_rows(cos), _unit_rows(sin)
    batch, q_heads, length, dim = q.shape
    outputs = []
    for x in (q, k):  # each in x's layout, as eager torch keeps it
        dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
        outputs.append(torch.empty_like(x, dtype=dtype))
    cos, sin = cos.expand(batch, length, dim), sin.expand(batch, length, dim)
    launch(_rotary_kernel, (batch * length, q_heads + k.shape[1]), q, k, cos, sin, *outputs, q_heads, length,
           *q.stride()[:3], *k.stride()[:3], *cos.stride()[:2], *sin.stride()[:2], *outputs[0].stride()[:3],
           *outputs[1].stride()[:3], HALF=dim // 2, BLOCK=next_power_of_2(dim // 2), num_warps=1)
    return tuple(outputs)


@triton.jit
def gdn_log_decay(a, dt_bias, A_log):
    """A Gated DeltaNet layer's log decay g = -exp(A_log) * softplus(a + dt_bias) in float32 (F.softplus's
    threshold); the gates kernel here and the decode-step kernel (`gated_delta_rule/triton_decode.py`) share it."""
    a = a.to(tl.float32) + dt_bias.to(tl.float32)
    return -tl.exp(A_log.to(tl.float32)) * tl.where(a > 20.0, a, tl.log(1.0 + tl.exp(a)))


@triton.jit
def _gdn_gates_kernel(A, B, A_log, dt_bias, G, Beta, heads, a_stride, b_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    live = cols < heads
    g = gdn_log_decay(tl.load(A + row * a_stride + cols, mask=live, other=0.0),
                      tl.load(dt_bias + cols, mask=live, other=0.0), tl.load(A_log + cols, mask=live, other=0.0))
    tl.store(G + row * heads + cols, g, mask=live)
    b = tl.load(B + row * b_stride + cols, mask=live, other=0.0).to(tl.float32)
    tl.store(Beta + row * heads + cols, tl.sigmoid(b).to(Beta.dtype.element_ty), mask=live)


def gdn_gates(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor):
    """`gated_delta_rule.torch_gdn_gates` as one kernel: (g float32, beta in b's dtype), each shaped as a."""
    rows_a, rows_b = _rows(a), _rows(b)
    g = torch.empty(a.shape, dtype=torch.float32, device=a.device)
    beta = torch.empty(b.shape, dtype=b.dtype, device=b.device)
    block = next_power_of_2(a.shape[-1])
    launch(_gdn_gates_kernel, (rows_a.shape[0],), rows_a, rows_b, A_log, dt_bias, g, beta, a.shape[-1],
           rows_a.stride(0), rows_b.stride(0), BLOCK=block, num_warps=1)
    return g, beta


# The ops (`dispatch.cuda_inference_op` names) these kernels implement.
KERNELS = {"rms_norm": rms_norm, "add_rms_norm": add_rms_norm, "gated_rms_norm": gated_rms_norm,
           "silu_mul": silu_mul, "silu_glu": silu_glu, "apply_rotary": apply_rotary, "gdn_gates": gdn_gates}


# The SiLU gates' programs take blocks of a row, so any width (the 4B model's joined gate/up is 22,016 wide); the
# others a whole row each, up to MAX_FEATURES.
COLUMN_BLOCKED = frozenset({"silu_mul", "silu_glu"})


def problem(first: torch.Tensor, *others) -> str | None:
    """Why the whole-row kernels cannot serve a call whose first argument is `first`, or None. It reads only what
    `problem_key` holds, so the answer can be cached by it."""
    reason = any_width_problem(first)
    if reason is None and first.shape[-1] > MAX_FEATURES:
        return f"rows of {first.shape[-1]} features, more than the kernels take ({MAX_FEATURES})"
    return reason


def any_width_problem(first: torch.Tensor, *others) -> str | None:
    """Why the column-blocked kernels (`COLUMN_BLOCKED`) cannot serve a call on `first`, or None."""
    elsewhere = cuda_inference_problem(first) or current_device_problem(first)
    if elsewhere is not None:
        return elsewhere
    if first.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"a {first.dtype} input"
    return None


def problem_for(name: str):
    """The fit check of the kernel of op `name`."""
    return any_width_problem if name in COLUMN_BLOCKED else problem


def problem_key(first: torch.Tensor, *others) -> tuple:
    here = first.device.index == current_cuda_device() if first.is_cuda else None
    return first.device.type, here, torch.is_grad_enabled(), first.dtype, first.shape[-1] <= MAX_FEATURES
