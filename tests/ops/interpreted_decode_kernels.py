"""Run by test_decode_kernels.py in a subprocess with TRITON_INTERPRET=1 (set before Triton is imported):
the decode kernels under Triton's CPU interpreter against their torch definitions. Exits non-zero on the
first mismatch, printing every comparison."""

import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from interpreted_checks import check, failures  # noqa: E402
from infinitevl_hf.modeling.ops.decode_attention.reference import ring_decode_attention  # noqa: E402
from infinitevl_hf.modeling.ops.decode_attention.triton_decode_attention import triton_ring_decode_attention  # noqa: E402
from infinitevl_hf.modeling.ops.gated_delta_rule.reference import torch_gated_delta_rule_decode_step  # noqa: E402
from infinitevl_hf.modeling.ops.gated_delta_rule.triton_decode import triton_gated_delta_rule_decode_step  # noqa: E402
from infinitevl_hf.modeling.ops.matvec import (_rows_add_rms_norm_matvec, _rows_gated_rms_norm_matvec, _rows_matvec,  # noqa: E402
                                              _rows_rms_norm_matvec)
from infinitevl_hf.modeling.ops.matvec import reference as R  # noqa: E402
from infinitevl_hf.modeling.ops.matvec import triton_matvec as T  # noqa: E402

CONFIG = dict(BLOCK_N=8, BLOCK_K=64, num_warps=4)  # K=96 makes the last input block partial

# The rows paths call the elementwise ops, which take their torch definitions off CUDA: here they take the package's
# Triton kernels, so that the rows checks compare kernels (and how the rows paths compose them) with the references.
from infinitevl_hf.modeling.ops import matvec as matvec_ops  # noqa: E402
from infinitevl_hf.modeling.ops.triton_elementwise import KERNELS  # noqa: E402

for _name in ("add_rms_norm", "gated_rms_norm", "rms_norm"):
    setattr(matvec_ops, _name, KERNELS[_name])


for dtype in (torch.float32, torch.bfloat16):
    torch.manual_seed(0)
    K, N = 96, 40  # N not a multiple of BLOCK_N: masked rows
    x = torch.randn(1, K, dtype=dtype)
    w = (torch.randn(N, K) * 0.1).to(dtype)
    bias, residual, norm_w = torch.randn(N, dtype=dtype), torch.randn(1, N, dtype=dtype), torch.randn(K, dtype=dtype)
    check("matvec + bias + residual", T.fused_matvec(x, w, bias, residual=residual, config=CONFIG),
          R.matvec_reference(x, w, bias, residual), dtype)
    own = residual.clone()  # the sum written over the residual (a decode step's hidden state)
    got = T.fused_matvec(x, w, bias, residual=own, config=CONFIG, out=own)
    assert got is own
    check("matvec + bias + residual, in place", own, R.matvec_reference(x, w, bias, residual), dtype)
    check("rms norm + matvec + bias", T.fused_matvec(x, w, bias, norm_weight=norm_w, eps=1e-6, config=CONFIG),
          R.rms_norm_matvec_reference(x, norm_w, 1e-6, w, bias), dtype)
    w_gate_up = (torch.randn(2 * N, K) * 0.1).to(dtype)
    check("rms norm + matvec + silu(gate)*up", T.fused_matvec(x, w_gate_up, norm_weight=norm_w, eps=1e-6, glu=True, config=CONFIG),
          R.rms_norm_matvec_reference(x, norm_w, 1e-6, w_gate_up, glu=True), dtype)
    # the residual add before the norm in the prologue, its sum written by the first of several programs
    delta, xs, deltas = torch.randn(1, K, dtype=dtype), torch.randn(3, K, dtype=dtype), torch.randn(3, K, dtype=dtype)
    for label, weight, extra in (("silu(gate)*up", w_gate_up, dict(glu=True)), ("bias", w, dict(bias=bias))):
        total = torch.full((1, K), float("nan"), dtype=dtype)
        got = T.fused_matvec(x, weight, extra.get("bias"), norm_weight=norm_w, eps=1e-6, glu=extra.get("glu", False),
                             config=CONFIG, x_delta=delta, x_sum=total)
        want_sum, want = R.add_rms_norm_matvec_reference(x, delta, norm_w, 1e-6, weight, **extra)
        check(f"add + rms norm + matvec + {label}", got, want, dtype)
        check(f"add + rms norm + matvec + {label}: sum", total, want_sum, dtype)
        got_sum, got = _rows_add_rms_norm_matvec(xs, deltas, norm_w, 1e-6, weight, **extra)
        want_sum, want = R.add_rms_norm_matvec_reference(xs, deltas, norm_w, 1e-6, weight, **extra)
        check(f"rows: add + norm + product + {label}", got, want, dtype)
        check(f"rows: add + norm + product + {label}: sum", got_sum, want_sum, dtype)

    sizes, taps, rows = (16, 16, 24), 4, 64  # conv over the first 56 rows, 8 rows left raw
    w_in = (torch.randn(rows, K) * 0.1).to(dtype)
    conv_w, conv_b = torch.randn(sum(sizes), taps, dtype=dtype), torch.randn(sum(sizes), dtype=dtype)

    def check_conv(label, rows_of_states, conv_bias, run, reference):
        """`run(conv)` against `reference(conv)`, each over its own copy of the same states, outputs and states."""
        states = tuple(torch.randn(rows_of_states, s, taps - 1, dtype=dtype) for s in sizes)
        expected_states = tuple(s.clone() for s in states)
        got = run(R.ConvUpdate(conv_w, conv_bias, states))
        expected = reference(R.ConvUpdate(conv_w, conv_bias, expected_states))
        check(label.format(""), got, expected, dtype)
        check(label.format(" states"), torch.cat(states, 1), torch.cat(expected_states, 1), dtype)

    # one row: the fused kernel; several rows: cuBLAS's product between the norm and the convolutions (over their
    # channels in place) or the gate
    xs = torch.randn(3, K, dtype=dtype)
    for b in (None, conv_b):
        bias_label = "with bias" if b is not None else "no bias"
        check_conv(f"norm + matvec + conv{{}} ({bias_label})", 1, b,
                   lambda conv: T.fused_matvec(x, w_in, norm_weight=norm_w, eps=1e-6, conv=conv, config=CONFIG),
                   lambda conv: R.rms_norm_matvec_reference(x, norm_w, 1e-6, w_in, conv=conv))
        # without the norm: the module path's Gated DeltaNet projection with its convolutions in it
        check_conv(f"matvec + conv{{}} ({bias_label})", 1, b,
                   lambda conv: T.fused_matvec(x, w_in, conv=conv, config=CONFIG),
                   lambda conv: R.matvec_reference(x, w_in, conv=conv))
        check_conv(f"rows: norm + product + conv{{}} ({bias_label})", 3, b,
                   lambda conv: _rows_rms_norm_matvec(xs, norm_w, 1e-6, w_in, conv=conv),
                   lambda conv: R.rms_norm_matvec_reference(xs, norm_w, 1e-6, w_in, conv=conv))
        check_conv(f"rows: product + conv{{}} ({bias_label})", 3, b,
                   lambda conv: _rows_matvec(xs, w_in, conv=conv),
                   lambda conv: R.matvec_reference(xs, w_in, conv=conv))
    check("rows: norm + product + silu(gate)*up", _rows_rms_norm_matvec(xs, norm_w, 1e-6, w_gate_up, glu=True),
          R.rms_norm_matvec_reference(xs, norm_w, 1e-6, w_gate_up, glu=True), dtype)
    check("rows: norm + product + bias", _rows_rms_norm_matvec(xs, norm_w, 1e-6, w, bias),
          R.rms_norm_matvec_reference(xs, norm_w, 1e-6, w, bias), dtype)

    # the gated output norm per head in the product's prologue: 6 heads of 32 in blocks of 64 (three blocks), 10
    # rows in programs of 4 (the last one partial); a gate sliced out of a wider projection row
    head_dim, inputs = 32, 192
    heads_x, wide = torch.randn(1, inputs, dtype=dtype), torch.randn(1, inputs + 7, dtype=dtype)
    gate_x, o_norm_w, w_out = wide[:, 7:], torch.randn(head_dim, dtype=dtype), (torch.randn(10, inputs) * 0.1).to(dtype)
    check("gated norm + matvec", T.gated_norm_matvec(heads_x, gate_x, o_norm_w, 1e-5, w_out),
          R.gated_rms_norm_matvec_reference(heads_x, gate_x, o_norm_w, 1e-5, w_out), dtype)
    rows_x, rows_gate = torch.randn(3, inputs, dtype=dtype), torch.randn(3, inputs + 7, dtype=dtype)[:, 7:]
    check("rows: gated norm + product", _rows_gated_rms_norm_matvec(rows_x, rows_gate, o_norm_w, 1e-5, w_out),
          R.gated_rms_norm_matvec_reference(rows_x, rows_gate, o_norm_w, 1e-5, w_out), dtype)

    batch, heads, d_k, d_v = 2, 3, 16, 64
    proj = torch.randn(batch, 2 * heads * d_k + 2 * heads * d_v + 2 * heads + 5, dtype=dtype)  # + 5 unrelated columns
    q, k, v, a, b, gate, _ = proj.split((heads * d_k, heads * d_k, heads * d_v, heads, heads, heads * d_v, 5), dim=-1)
    A_log, dt_bias = torch.randn(heads), torch.randn(heads)
    state = torch.randn(batch, heads, d_k, d_v)
    expected_state = state.clone()
    got = triton_gated_delta_rule_decode_step(q, k, v, a, b, A_log, dt_bias, state)
    expected = torch_gated_delta_rule_decode_step(q, k, v, a, b, A_log, dt_bias, expected_state)
    check("delta rule step: output", got, expected, dtype)
    check("delta rule step: state", state, expected_state, dtype)

    # a ring of 80 slots in blocks of 32 (the last one partial), half of one row not written yet
    batch, heads, kv_heads, head_dim, slots = 2, 4, 2, 32, 80
    query = torch.randn(batch, heads, 1, head_dim, dtype=dtype)
    keys, values = torch.randn(batch, kv_heads, slots, head_dim, dtype=dtype), torch.randn(batch, kv_heads, slots, head_dim, dtype=dtype)
    valid = torch.ones(batch, slots, dtype=torch.bool)
    valid[1, 40:] = False
    check("ring decode attention", triton_ring_decode_attention(query, keys, values, valid, head_dim**-0.5, split=32, block_s=16),
          ring_decode_attention(query, keys, values, valid, head_dim**-0.5), dtype)
    # a young ring: row 0 wrote its first 5 slots and one past a block of unwritten ones (a prompt's left padding
    # sits at the ring's end, flagged invalid); row 1 only its first slot. The unwritten blocks are skipped.
    valid = torch.zeros(batch, slots, dtype=torch.bool)
    valid[0, :5] = valid[0, 70] = valid[1, 0] = True
    check("ring decode attention, young ring", triton_ring_decode_attention(query, keys, values, valid, head_dim**-0.5,
                                                                             split=32, block_s=16),
          ring_decode_attention(query, keys, values, valid, head_dim**-0.5), dtype)

sys.exit(1 if failures else 0)
