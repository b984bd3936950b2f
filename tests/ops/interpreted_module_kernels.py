"""Run by test_module_kernels.py in a subprocess with TRITON_INTERPRET=1 (set before Triton is imported): the
kernels the module path runs on CUDA (norms, SiLU gates, text rotary, the one-token conv and delta rule) under
Triton's CPU interpreter against their torch definitions. Exits non-zero on the first mismatch, printing every
comparison."""

import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from interpreted_checks import check, failures  # noqa: E402
from infinitevl_hf.modeling.ops import elementwise as E  # noqa: E402
from infinitevl_hf.modeling.ops import norms as N  # noqa: E402
from infinitevl_hf.modeling.ops import triton_elementwise as T  # noqa: E402
from infinitevl_hf.modeling.ops.causal_conv1d.reference import torch_causal_conv1d  # noqa: E402
from infinitevl_hf.modeling.ops.causal_conv1d.triton_step import (  # noqa: E402
    conv1d_step3_in_place,
    triton_conv1d_step,
    triton_conv1d_step3,
)
from infinitevl_hf.modeling.ops.matvec.reference import ConvUpdate, apply_conv  # noqa: E402
from infinitevl_hf.modeling.ops.gated_delta_rule.reference import (  # noqa: E402
    torch_fused_recurrent_gated_delta_rule,
    torch_gdn_gates,
)
from infinitevl_hf.modeling.ops.gated_delta_rule.triton_decode import triton_recurrent_one_token  # noqa: E402


for dtype in (torch.float32, torch.bfloat16):
    torch.manual_seed(0)
    x = torch.randn(3, 10, 40, dtype=dtype)[:, ::2]  # strided rows, 40 features (not a power of two)
    w = torch.rand(40, dtype=dtype) + 0.5
    check("rms_norm", T.rms_norm(x, w, 1e-6), N.torch_rms_norm(x, w, 1e-6), dtype)
    check("rms_norm, float32 weight", T.rms_norm(x, w.float(), 1e-6), N.torch_rms_norm(x, w.float(), 1e-6), dtype)
    delta = torch.randn(3, 5, 40, dtype=dtype)
    for got, expected in zip(T.add_rms_norm(x, delta, w, 1e-6), N.torch_add_rms_norm(x, delta, w, 1e-6)):
        check("add_rms_norm", got, expected, dtype)
    o, gate = torch.randn(2, 3, 4, 48, dtype=dtype), torch.randn(2, 3, 4, 48, dtype=dtype)
    w48 = torch.rand(48) + 0.5
    check("gated_rms_norm", T.gated_rms_norm(o, w48, gate, 1e-5), N.torch_gated_rms_norm(o, w48, gate, 1e-5), dtype)
    check("gated_rms_norm, no gate", T.gated_rms_norm(o, w48, None, 1e-5), N.torch_gated_rms_norm(o, w48, None, 1e-5), dtype)
    check("gated_rms_norm, float32 x", T.gated_rms_norm(o.float(), w48, gate, 1e-5),
          N.torch_gated_rms_norm(o.float(), w48, gate, 1e-5), dtype)
    proj = torch.randn(6, 4 * 48 + 10, dtype=dtype)  # a batch's gate heads slicing a projection's rows
    sliced, o2 = proj[:, 5 : 5 + 4 * 48].view(6, 4, 48), torch.randn(6, 4, 48, dtype=dtype)
    check("gated_rms_norm, gate slicing a projection", T.gated_rms_norm(o2, w48, sliced, 1e-5),
          N.torch_gated_rms_norm(o2, w48, sliced, 1e-5), dtype)
    shared = torch.randn(6, 1, 48, dtype=dtype)  # one gate row for every head (broadcast)
    check("gated_rms_norm, broadcast gate", T.gated_rms_norm(o2, w48, shared, 1e-5),
          N.torch_gated_rms_norm(o2, w48, shared, 1e-5), dtype)
    g, u = torch.randn(2, 3, 1300, dtype=dtype), torch.randn(2, 3, 1300, dtype=dtype)  # two column blocks
    check("silu_mul", T.silu_mul(g, u), E.torch_silu_mul(g, u), dtype)
    gu = torch.randn(5, 74, dtype=dtype)
    check("silu_glu", T.silu_glu(gu), E.torch_silu_glu(gu), dtype)
    q = torch.randn(2, 3, 4, 16, dtype=dtype).transpose(1, 2)  # [B, H, T, D] as the attention's view
    k = torch.randn(2, 3, 2, 16, dtype=dtype).transpose(1, 2)
    for cos_batch in (2, 1):
        cos, sin = torch.randn(cos_batch, 3, 16, dtype=dtype), torch.randn(cos_batch, 3, 16, dtype=dtype)
        for got, expected in zip(T.apply_rotary(q, k, cos, sin), E.torch_apply_rotary(q, k, cos, sin)):
            check(f"apply_rotary (cos batch {cos_batch})", got, expected, dtype)
            assert got.stride() == expected.stride(), (got.stride(), expected.stride())
    mixed = torch.randn(1, 3, 16)  # a float32 sin beside a bf16 cos: the result takes the promoted dtype
    for got, expected in zip(T.apply_rotary(q, k, cos, mixed), E.torch_apply_rotary(q, k, cos, mixed)):
        check("apply_rotary (float32 sin)", got, expected, dtype)

    for channels in (40, 300):  # one block of channels, then two with the last partial
        xs = torch.randn(2, 1, channels, dtype=dtype)
        cw, cb = torch.randn(channels, 4, dtype=dtype), torch.randn(channels, dtype=dtype)
        for bias in (None, cb):
            for state in (None, torch.randn(2, channels, 3, dtype=dtype)):
                for activation in ("silu", None):
                    label = f"conv step D={channels} bias={bias is not None} state={state is not None} {activation}"
                    got = triton_conv1d_step(xs, cw, bias, activation, state, True)
                    expected = torch_causal_conv1d(xs, cw, bias, activation, state, True)
                    check(label, got[0], expected[0], dtype)
                    check(label + " (state)", got[1], expected[1], dtype)
        assert triton_conv1d_step(xs, cw, None, "silu", None, False)[1] is None
        state = torch.randn(2, channels, 3, dtype=dtype)  # the new state written over the old (a cache's)
        expected = torch_causal_conv1d(xs, cw, cb, "silu", state, True)
        own = state.clone()
        got = triton_conv1d_step(xs, cw, cb, "silu", own, True, final_state=own)
        assert got[1] is own
        check(f"conv step D={channels} in place", got[0], expected[0], dtype)
        check(f"conv step D={channels} in place (state)", own, expected[1], dtype)

    # q, k, v's convolutions in one launch: slices of one projection row, block counts 1, 2 and 2 (partial last)
    sizes = (40, 300, 260)
    row = torch.randn(2, 1, sum(sizes) + 7, dtype=dtype)
    xs3 = row[..., :sum(sizes)].split(sizes, dim=-1)
    weights3 = [torch.randn(d, 4, dtype=dtype) for d in sizes]
    for biases3 in ((None,) * 3, [torch.randn(d, dtype=dtype) for d in sizes]):
        states3 = [torch.randn(2, d, 3, dtype=dtype) for d in sizes]
        expected3 = [torch_causal_conv1d(x, w, bb, "silu", s, True) for x, w, bb, s in zip(xs3, weights3, biases3, states3)]
        joined = triton_conv1d_step3(xs3, weights3, biases3, states3)
        label = f"conv step x3 bias={biases3[0] is not None}"
        assert joined.shape == (2, 1, sum(sizes)), joined.shape
        for i, (got, (y, final)) in enumerate(zip(joined.split(sizes, dim=-1), expected3)):
            check(f"{label} output {i}", got, y, dtype)
            check(f"{label} state {i} in place", states3[i], final, dtype)
        # the same convolutions written over the channels of a batch's projection output [B, N] where they stand
        proj = torch.randn(3, sum(sizes) + 9, dtype=dtype)
        states3 = [torch.randn(3, d, 3, dtype=dtype) for d in sizes]
        expected_states = [s.clone() for s in states3]
        expected = apply_conv(proj.clone(), ConvUpdate(tuple(weights3), None if biases3[0] is None else tuple(biases3),
                                                       tuple(expected_states)))
        got = conv1d_step3_in_place(proj, weights3, biases3, states3)
        assert got is proj
        check(f"{label} in place over a projection", got, expected, dtype)
        check(f"{label} in place over a projection (states)", torch.cat(states3, 1), torch.cat(expected_states, 1), dtype)

    a, b = torch.randn(2, 5, 6, dtype=dtype) * 8, torch.randn(2, 5, 6, dtype=dtype)  # past softplus' threshold too
    A_log, dt_bias = torch.randn(6), torch.randn(6, dtype=dtype)
    for got, expected in zip(T.gdn_gates(a, b, A_log, dt_bias), torch_gdn_gates(a, b, A_log, dt_bias)):
        check("gdn_gates", got, expected, dtype)

    heads, d_k, d_v = 3, 16, 64  # two blocks of value columns
    q1, k1 = torch.randn(2, 1, heads, d_k, dtype=dtype), torch.randn(2, 1, heads, d_k, dtype=dtype)
    v1 = torch.randn(2, 1, heads, d_v, dtype=dtype)
    g1, beta1 = -torch.rand(2, 1, heads), torch.rand(2, 1, heads, dtype=dtype)
    for state in (None, torch.randn(2, heads, d_k, d_v) * 0.1):
        for norm in (True, False):
            label = f"recurrent one token state={state is not None} l2norm={norm}"
            got = triton_recurrent_one_token(q1, k1, v1, g1, beta1, None, state, True, use_qk_l2norm_in_kernel=norm)
            expected = torch_fused_recurrent_gated_delta_rule(q1, k1, v1, g1, beta1, None, state, True,
                                                               use_qk_l2norm_in_kernel=norm)
            check(label, got[0], expected[0], dtype)
            check(label + " (state)", got[1], expected[1], torch.float32 if dtype == torch.float32 else dtype)
    assert triton_recurrent_one_token(q1, k1, v1, g1, beta1, 0.5, None, False)[1] is None
    state = torch.randn(2, heads, d_k, d_v) * 0.1
    expected = torch_fused_recurrent_gated_delta_rule(q1, k1, v1, g1, beta1, None, state, True, use_qk_l2norm_in_kernel=True)
    own = state.clone()
    got = triton_recurrent_one_token(q1, k1, v1, g1, beta1, None, own, True, use_qk_l2norm_in_kernel=True, final_state=own)
    assert got[1] is own
    check("recurrent one token in place", got[0], expected[0], dtype)
    check("recurrent one token in place (state)", own, expected[1], torch.float32 if dtype == torch.float32 else dtype)

sys.exit(1 if failures else 0)
