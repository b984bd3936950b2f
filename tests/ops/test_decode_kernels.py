"""The fused decode kernels (ops.matvec's prologues/epilogues, ops.gated_delta_rule's decode step) against
their torch definitions: under Triton's CPU interpreter everywhere, compiled on a GPU."""

from pathlib import Path

import pytest
import torch

from helpers import run_under_triton_interpreter, set_current_cuda_device
from infinitevl_hf.modeling.ops.gated_delta_rule import gated_delta_rule_decode_step, torch_gated_delta_rule_decode_step
from infinitevl_hf.modeling.ops.matvec import ConvUpdate, matvec, rms_norm_matvec
from infinitevl_hf.modeling.ops.norms import gated_rms_norm, rms_norm


def test_kernels_match_their_torch_definitions_under_the_triton_interpreter():
    output = run_under_triton_interpreter(Path(__file__).with_name("interpreted_decode_kernels.py"))
    assert output.count("ok  ") == 72, output


def test_ops_take_their_torch_definition_off_cuda():
    x, w, r = torch.randn(1, 8), torch.randn(6, 8), torch.randn(1, 6)
    torch.testing.assert_close(matvec(x, w, residual=r), r + x @ w.T)
    rows, norm_w = torch.randn(2, 8), torch.rand(8)  # two rows
    h = rms_norm(rows, norm_w, 1e-6) @ w.T
    torch.testing.assert_close(rms_norm_matvec(rows, norm_w, 1e-6, w, glu=True), torch.nn.functional.silu(h[:, :3]) * h[:, 3:])
    # separate weights (not joined) give the concatenation of their outputs
    w2 = torch.randn(3, 8)
    torch.testing.assert_close(rms_norm_matvec(x, norm_w, 1e-6, (w, w2)), rms_norm_matvec(x, norm_w, 1e-6, torch.cat([w, w2])))


def test_a_convolution_over_a_gated_product_is_refused_by_name():
    conv = ConvUpdate(torch.randn(4, 4), None, (torch.randn(1, 2, 3), torch.randn(1, 1, 3), torch.randn(1, 1, 3)))
    with pytest.raises(ValueError, match="GLU"):
        matvec(torch.randn(1, 8), torch.randn(12, 8), glu=True, conv=conv)


def test_decode_step_with_the_output_norm_is_the_step_then_the_norm():
    batch, heads, d_k, d_v = 2, 3, 4, 8
    q, k, gate = torch.randn(batch, heads * d_k), torch.randn(batch, heads * d_k), torch.randn(batch, heads * d_v)
    v, a, b = torch.randn(batch, heads * d_v), torch.randn(batch, heads), torch.randn(batch, heads)
    A_log, dt_bias, norm_w = torch.randn(heads), torch.randn(heads), torch.rand(d_v)
    state = torch.randn(batch, heads, d_k, d_v)
    plain_state, gated_state = state.clone(), state.clone()
    o = gated_delta_rule_decode_step(q, k, v, a, b, A_log, dt_bias, plain_state)
    normed = gated_delta_rule_decode_step(q, k, v, a, b, A_log, dt_bias, gated_state, gate=gate, norm_weight=norm_w, norm_eps=1e-5)
    expected = gated_rms_norm(o.view(batch, heads, d_v), norm_w, gate.view(batch, heads, d_v), 1e-5).view(batch, -1)
    torch.testing.assert_close(normed, expected)
    torch.testing.assert_close(gated_state, plain_state)
    assert not torch.equal(plain_state, state)


def test_conv_over_the_first_channels_shifts_each_state():
    x, w = torch.randn(1, 8), torch.randn(7, 8)
    states = (torch.randn(1, 2, 3), torch.randn(1, 2, 3), torch.randn(1, 1, 3))
    before = [s.clone() for s in states]
    conv_w = torch.randn(5, 4)
    y = rms_norm_matvec(x, torch.ones(8), 1e-6, w, conv=ConvUpdate(conv_w, None, states))
    plain = rms_norm_matvec(x, torch.ones(8), 1e-6, w)
    torch.testing.assert_close(y[:, 5:], plain[:, 5:])  # rows past the conv channels stay raw
    window = torch.cat([torch.cat(before, 1), plain[:, :5, None]], -1)
    torch.testing.assert_close(y[:, :5], torch.nn.functional.silu((window * conv_w).sum(-1)))
    torch.testing.assert_close(torch.cat(states, 1), window[..., 1:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_kernels_match_their_torch_definitions_on_the_gpu():
    from infinitevl_hf.modeling.ops.matvec import matvec_available

    assert matvec_available()
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    hidden, heads, d_k, d_v = 2048, 16, 128, 256  # InfiniteVL-4B's shapes
    sizes = (heads * d_k, heads * d_k, heads * d_v, heads, heads, heads * d_v)
    x, norm_w = torch.randn(1, hidden, device=dev, dtype=dt), torch.rand(hidden, device=dev, dtype=dt) + 0.5
    w_in = torch.randn(sum(sizes), hidden, device=dev, dtype=dt) * hidden**-0.5
    conv_w = torch.randn(sum(sizes[:3]), 4, device=dev, dtype=dt) * 0.5
    states = tuple(torch.randn(1, s, 3, device=dev, dtype=dt) for s in sizes[:3])
    ref_states = tuple(s.clone() for s in states)
    proj = rms_norm_matvec(x, norm_w, 1e-6, w_in, conv=ConvUpdate(conv_w, None, states))
    ref = rms_norm_matvec(x, norm_w, 1e-6, w_in, conv=ConvUpdate(conv_w, None, ref_states), fast=False)
    assert rel(proj, ref) < 1e-2 and rel(torch.cat(states, 1), torch.cat(ref_states, 1)) < 1e-2

    q, k, v, a, b, gate = ref.split(sizes, dim=-1)
    A_log, dt_bias = torch.rand(heads, device=dev), torch.randn(heads, device=dev)
    o_norm_w = torch.rand(d_v, device=dev, dtype=dt) + 0.5
    for extra in ({}, dict(gate=gate, norm_weight=o_norm_w, norm_eps=1e-5)):
        state = torch.randn(1, heads, d_k, d_v, device=dev) * 0.1
        ref_state = state.clone()
        o = gated_delta_rule_decode_step(q, k, v, a, b, A_log, dt_bias, state, **extra)
        ref_o = torch_gated_delta_rule_decode_step(q, k, v, a, b, A_log, dt_bias, ref_state, **extra)
        errors = (rel(o, ref_o), rel(state, ref_state))
        assert errors[0] < 1e-2 and errors[1] < 1e-5, (sorted(extra), errors)

    w_o = torch.randn(hidden, heads * d_v, device=dev, dtype=dt) * 0.02
    error = rel(matvec(ref_o, w_o, residual=x), matvec(ref_o, w_o, residual=x, fast=False))
    assert error < 1e-2, error
    w_gu, w_down = torch.randn(22016, hidden, device=dev, dtype=dt) * 0.02, torch.randn(hidden, 11008, device=dev, dtype=dt) * 0.01
    act = rms_norm_matvec(x, norm_w, 1e-6, w_gu, glu=True)
    error = rel(act, rms_norm_matvec(x, norm_w, 1e-6, w_gu, glu=True, fast=False))
    assert error < 1e-2, error
    error = rel(matvec(act, w_down, residual=x), matvec(act, w_down, residual=x, fast=False))
    assert error < 1e-2, error


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch,filled", [(1, 8192), (1, 3000), (3, 5000)])
def test_split_key_decode_attention_matches_the_torch_path_on_the_gpu(batch, filled):
    from infinitevl_hf.modeling.ops.decode_attention import decode_attention, ring_decode_attention

    torch.manual_seed(batch)
    heads, kv_heads, dim, slots = 16, 2, 128, 8192  # InfiniteVL-4B's ring
    query = torch.randn(batch, heads, 1, dim, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(batch, kv_heads, slots, dim, device="cuda", dtype=torch.bfloat16)
    values = torch.randn(batch, kv_heads, slots, dim, device="cuda", dtype=torch.bfloat16)
    valid = torch.zeros(batch, slots, dtype=torch.bool, device="cuda")
    valid[:, torch.randperm(slots, device="cuda")[:filled]] = True
    got = decode_attention(query, keys, values, valid, dim**-0.5).float()
    expected = ring_decode_attention(query.double(), keys.double(), values.double(), valid, dim**-0.5).float()
    bf16_path = ring_decode_attention(query, keys, values, valid, dim**-0.5).float()
    error, bf16_error = ((got - expected).norm() / expected.norm()).item(), ((bf16_path - expected).norm() / expected.norm()).item()
    assert error < 1e-2 and error <= 1.5 * bf16_error, (error, bf16_error)


def test_several_cuda_rows_take_cublas_between_the_package_kernels(monkeypatch):
    """The choice for `rms_norm_matvec` (read off metadata, without a GPU): one CUDA row the fused matvec kernel,
    several the rows path (cuBLAS's product, the norm / convolutions / gate kernels), the torch definition where
    neither serves."""
    from helpers import CudaLike
    from infinitevl_hf.modeling.ops import dispatch
    from infinitevl_hf.modeling.ops.matvec import _rows_matvec_fits, _rows_rms_norm_matvec_fits

    if not dispatch.triton_available():
        pytest.skip("Triton is not installed (the kernels are not registered)")
    set_current_cuda_device(monkeypatch, 0)

    def meta(*shape, dtype=torch.bfloat16):
        return CudaLike(torch.empty(*shape, device="meta", dtype=dtype))

    norm_w, w = meta(64), meta(56, 64)
    conv = ConvUpdate(meta(40, 4), None, (meta(8, 16, 3), meta(8, 16, 3), meta(8, 8, 3)))
    one_row_conv = conv._replace(states=(meta(1, 16, 3), meta(1, 16, 3), meta(1, 8, 3)))
    with torch.no_grad():
        assert dispatch.decide("rms_norm_matvec", meta(1, 64), norm_w, 1e-6, w, None, one_row_conv) == ("triton", None)
        # states of other rows, taps or widths than the product's: the kernels would address past them
        for bad in (conv, one_row_conv._replace(weight=meta(40, 3)), one_row_conv._replace(weight=meta(48, 4))):
            assert dispatch.decide("rms_norm_matvec", meta(1, 64), norm_w, 1e-6, w, None, bad)[0] == "torch"
        assert "rows" in _rows_rms_norm_matvec_fits(meta(4, 64), norm_w, 1e-6, w, None, conv)
        assert "cover" in _rows_rms_norm_matvec_fits(meta(8, 64), norm_w, 1e-6, meta(32, 64), None, conv)
        name, skipped = dispatch.decide("rms_norm_matvec", meta(8, 64), norm_w, 1e-6, w, None, conv)
        assert name == "rows" and "one row" in skipped
        assert _rows_rms_norm_matvec_fits(meta(8, 64), norm_w, 1e-6, w, glu=True) is None
        assert "separate" in _rows_rms_norm_matvec_fits(meta(8, 64), norm_w, 1e-6, (w, w))
        float_states = (meta(8, 16, 3), meta(8, 16, 3), meta(8, 8, 3, dtype=torch.float32))
        assert "dtype" in _rows_rms_norm_matvec_fits(meta(8, 64), norm_w, 1e-6, w, None, conv._replace(states=float_states))
        assert "rows" in _rows_rms_norm_matvec_fits(meta(8, 1, 64), norm_w, 1e-6, w)
        assert dispatch.decide("rms_norm_matvec", meta(8, 64), norm_w, 1e-6, w, None, conv, reference=True)[0] == "torch"
        assert dispatch.decide("matvec", meta(1, 64), w, None, meta(1, 56)) == ("triton", None)
        assert dispatch.decide("matvec", meta(1, 64), w, None, meta(56))[0] == "torch"  # not [1, outputs]
        assert dispatch.decide("matvec", meta(1, 64), w, None, meta(1, 32))[0] == "torch"
        assert dispatch.decide("matvec", meta(8, 64), w, None, meta(8, 56))[0] == "rows"
        assert "residual" in _rows_matvec_fits(meta(8, 64), w, None, meta(1, 56))
        # a product with the convolutions over its first channels (the module path's Gated DeltaNet projection)
        assert dispatch.decide("matvec", meta(1, 64), w, None, None, False, False, one_row_conv) == ("triton", None)
        assert dispatch.decide("matvec", meta(1, 64), w, None, None, False, False, conv)[0] == "torch"  # 8-row states
        assert dispatch.decide("matvec", meta(8, 64), w, None, None, False, False, conv)[0] == "rows"
        assert "cover" in _rows_matvec_fits(meta(8, 64), meta(32, 64), None, None, False, False, conv)
        assert "GLU" in _rows_matvec_fits(meta(8, 64), meta(112, 64), None, None, True, False, conv)
        assert "dtype" in _rows_matvec_fits(meta(8, 64), w, None, None, False, False, conv._replace(states=float_states))
        one_tap = ConvUpdate(meta(40, 1), None, (meta(1, 16, 0), meta(1, 16, 0), meta(1, 8, 0)))
        assert "one tap" in dispatch.decide("matvec", meta(1, 64), w, None, None, False, False, one_tap)[1]
        # float64: the one-row kernel computes in float32; cuBLAS's float64 product (the rows path) takes the call
        wide = meta(1, 64, dtype=torch.float64)
        name, skipped = dispatch.decide("matvec", wide, meta(56, 64, dtype=torch.float64), None, meta(1, 56, dtype=torch.float64))
        assert name == "rows" and "float64" in skipped
        assert "residual" in _rows_matvec_fits(meta(8, 64), w, None, meta(8, 56, dtype=torch.float32))
    grads = CudaLike(torch.empty(8, 64, device="meta", requires_grad=True))
    with torch.enable_grad():
        assert "gradients" in _rows_rms_norm_matvec_fits(grads, norm_w, 1e-6, w)


def test_the_add_before_a_norm_joins_the_product_only_for_summands_alike(monkeypatch):
    """The choice for `add_rms_norm_matvec` (metadata only): one CUDA row the fused kernel, several the rows path;
    summands that differ in shape or dtype, or a norm weight in another dtype than x (the kernel scales in x's
    dtype), the torch definition."""
    from helpers import CudaLike
    from infinitevl_hf.modeling.ops import dispatch

    if not dispatch.triton_available():
        pytest.skip("Triton is not installed (the kernels are not registered)")
    set_current_cuda_device(monkeypatch, 0)

    def meta(*shape, dtype=torch.bfloat16):
        return CudaLike(torch.empty(*shape, device="meta", dtype=dtype))

    norm_w, w = meta(64), meta(112, 64)
    with torch.no_grad():
        assert dispatch.decide("add_rms_norm_matvec", meta(1, 64), meta(1, 64), norm_w, 1e-6, w, None, True) == (
            "triton", None)
        name, skipped = dispatch.decide("add_rms_norm_matvec", meta(8, 64), meta(8, 64), norm_w, 1e-6, w, None, True)
        assert name == "rows" and "one row" in skipped
        for residual, delta in ((meta(1, 64), meta(1, 32)), (meta(1, 64), meta(1, 64, dtype=torch.float16))):
            name, skipped = dispatch.decide("add_rms_norm_matvec", residual, delta, norm_w, 1e-6, w, None, True)
            assert name == "torch" and "summands" in skipped
        name, skipped = dispatch.decide("add_rms_norm_matvec", meta(1, 64), meta(1, 64), meta(64, dtype=torch.float32),
                                        1e-6, w, None, True)
        assert name == "rows" and "norm weight" in skipped
        assert dispatch.decide("rms_norm_matvec", meta(1, 64), meta(64, dtype=torch.float32), 1e-6, w)[0] == "rows"


def test_several_rows_add_the_residual_in_the_product():
    """The rows path of `matvec` (CUDA, several rows): the residual in cuBLAS's epilogue (`addmm`), the gate as a
    kernel; on CPU tensors the same functions give the torch definition's results."""
    pytest.importorskip("triton")
    from infinitevl_hf.modeling.ops.matvec import _rows_matvec
    from infinitevl_hf.modeling.ops.matvec.reference import matvec_reference

    torch.manual_seed(0)
    x, w, r, bias = torch.randn(3, 8), torch.randn(6, 8), torch.randn(3, 6), torch.randn(6)
    for kwargs in (dict(residual=r), dict(bias=bias, residual=r), dict(bias=bias), dict(glu=True), {}):
        torch.testing.assert_close(_rows_matvec(x, w, **kwargs), matvec_reference(x, w, **kwargs))
    for kwargs in (dict(), dict(bias=bias)):  # in place: the sum written over the residual
        own = r.clone()
        assert _rows_matvec(x, w, residual=own, in_place=True, **kwargs) is own
        torch.testing.assert_close(own, matvec_reference(x, w, residual=r, **kwargs))
    xb, wb, rb = x.bfloat16(), w.bfloat16(), r.bfloat16()  # one rounding of the float32 sum, where torch rounds twice
    once = (rb.float() + xb.float() @ wb.float().T).bfloat16()
    torch.testing.assert_close(_rows_matvec(xb, wb, residual=rb), once, rtol=0, atol=0.02)


def test_in_place_residuals_are_written_over_only_outside_autograd():
    x, w = torch.randn(2, 8), torch.randn(6, 8)
    hidden = torch.randn(2, 6)
    with torch.no_grad():
        own = hidden.clone()
        assert matvec(x, w, residual=own, in_place=True) is own
        torch.testing.assert_close(own, hidden + x @ w.T)
    leaf = hidden.clone().requires_grad_()  # autograd on: a new tensor, and backward through it works
    normed = rms_norm(leaf, torch.ones(6), 1e-6)  # (saves leaf for its backward)
    out = matvec(normed, torch.randn(6, 6), residual=leaf, in_place=True)
    assert out is not leaf
    out.sum().backward()
    assert leaf.grad is not None
