"""The kernels the module path takes on CUDA (`triton_elementwise`, the one-token conv and delta rule) against
their torch definitions, under Triton's CPU interpreter everywhere and compiled on a GPU; and the choice of
them, made per call by `dispatch`."""

from pathlib import Path

import pytest
import torch

from helpers import CudaLike, run_under_triton_interpreter, set_current_cuda_device
from infinitevl_hf.modeling.ops import dispatch


def test_kernels_match_their_torch_definitions_under_the_triton_interpreter():
    output = run_under_triton_interpreter(Path(__file__).with_name("interpreted_module_kernels.py"))
    assert output.count("ok  ") == 162 and "FAIL" not in output, output


def test_the_module_path_ops_prefer_the_package_kernels_and_say_why_not_off_cuda():
    from infinitevl_hf.modeling.ops import causal_conv1d, elementwise, gated_delta_rule, norms  # noqa: F401 (registers)

    for name in ("rms_norm", "add_rms_norm", "gated_rms_norm", "silu_mul", "silu_glu", "apply_rotary",
                 "gdn_gates", "causal_conv1d", "fused_recurrent_gated_delta_rule"):
        assert [i.name for i in dispatch.op(name).implementations][0] == "triton", name
    x = torch.randn(1, 1, 8)
    with torch.no_grad():
        assert dispatch.decide("rms_norm", x, torch.ones(8), 1e-6) == ("torch", "triton: inputs are not on CUDA")
    assert dispatch.decide("causal_conv1d", x, torch.randn(8, 4), None, "silu", torch.zeros(1, 8, 3), True) == (
        "torch", "triton: inputs are not on CUDA")


@pytest.fixture
def current_device_0(monkeypatch):
    set_current_cuda_device(monkeypatch, 0)


def test_the_kernels_fit_one_token_of_cuda_inference_on_the_current_device_only(current_device_0):
    from infinitevl_hf.modeling.ops.causal_conv1d import _step_fits
    from infinitevl_hf.modeling.ops.decode_attention import _kernel_fits as attention_fits
    from infinitevl_hf.modeling.ops.gated_delta_rule import _one_token_fits
    from infinitevl_hf.modeling.ops.triton_elementwise import problem

    def meta(*shape, **kwargs):
        return torch.empty(*shape, device="meta", **kwargs)

    q, v, g, state = meta(2, 1, 3, 16), meta(2, 1, 3, 64), meta(2, 1, 3), meta(2, 3, 16, 64)
    args = [CudaLike(t) for t in (q, q, v, g, g)]
    assert _one_token_fits(*args, None, CudaLike(state), True) is None
    assert _one_token_fits(CudaLike(meta(2, 2, 3, 16)), *args[1:], None, None, False) == "more than one token per row"
    odd = [CudaLike(t) for t in (meta(2, 1, 3, 12), meta(2, 1, 3, 12), v, g, g)]
    assert "power-of-two key dim" in _one_token_fits(*odd, None, None, False)
    assert "not on the current device" in _one_token_fits(*[CudaLike(t, "cuda:1") for t in (q, q, v, g, g)], None, None, False)

    x, conv_w = CudaLike(meta(2, 1, 40)), CudaLike(meta(40, 4))
    assert _step_fits(x, conv_w, None, "silu", None, True) is None
    assert _step_fits(CudaLike(meta(2, 5, 40)), conv_w) == "more than one token per row"
    assert _step_fits(CudaLike(meta(2, 1, 40, dtype=torch.float64)), conv_w) == "a torch.float64 input"
    assert "cuda:1" in _step_fits(CudaLike(meta(2, 1, 40), "cuda:1"), conv_w)

    with torch.no_grad():
        assert problem(torch.empty(4, 8)) == "inputs are not on CUDA"
        assert problem(CudaLike(meta(4, 8))) is None
        assert "features" in problem(CudaLike(meta(4, 20000)))
        assert "torch.int64" in problem(CudaLike(meta(4, 8, dtype=torch.long)))
        assert "not on the current device" in problem(CudaLike(meta(4, 8), "cuda:1"))
    with torch.enable_grad():
        assert problem(CudaLike(meta(4, 8))) == "autograd is on"

    query, keys, valid = meta(1, 4, 1, 16), meta(1, 2, 32, 16), meta(1, 32, dtype=torch.bool)
    assert attention_fits(CudaLike(query), CudaLike(keys), CudaLike(keys), CudaLike(valid), 0.25) is None
    trained = CudaLike(meta(1, 4, 1, 16, requires_grad=True))
    with torch.enable_grad():  # eval mode with autograd on: the kernel has no backward
        assert "gradients" in attention_fits(trained, CudaLike(keys), CudaLike(keys), CudaLike(valid), 0.25)


def test_the_decode_step_kernels_serve_the_current_device_only(current_device_0):
    """The fused decode step's products and delta rule, like the module path's kernels: a tensor on cuda:1 while
    cuda:0 is current is left to torch (Triton would launch on cuda:0)."""
    from infinitevl_hf.modeling.ops.gated_delta_rule import _decode_step_fits
    from infinitevl_hf.modeling.ops.matvec import _kernel_problem

    def meta(*shape, **kwargs):
        return torch.empty(*shape, device="meta", **kwargs)

    assert "not on the current device" in _kernel_problem(CudaLike(meta(1, 64), "cuda:1"), meta(32, 64))
    q, v, a = CudaLike(meta(1, 48)), CudaLike(meta(1, 96)), CudaLike(meta(1, 3))
    state = meta(1, 3, 16, 32, dtype=torch.float32)
    assert _decode_step_fits(q, q, v, a, a, None, None, CudaLike(state)) is None
    assert "not on the current device" in _decode_step_fits(q, q, v, a, a, None, None, CudaLike(state, "cuda:1"))


def test_the_cached_choice_follows_the_current_device(current_device_0, monkeypatch):
    from infinitevl_hf.modeling.ops.triton_elementwise import problem_key

    x = CudaLike(torch.empty(1, 8, device="meta"), "cuda:1")
    away = problem_key(x)
    set_current_cuda_device(monkeypatch, 1)
    assert problem_key(x) != away


def test_the_silu_gates_take_rows_of_any_width_and_the_norms_up_to_their_limit(current_device_0):
    """The 4B model's joined gate/up (22,016 features, what a batch's decode step gates) goes to the SiLU kernel,
    whose programs take blocks of a row; a norm, whose programs take a whole row, names the width it cannot take
    (and takes its compiled form)."""
    from infinitevl_hf.modeling.ops import dispatch
    from infinitevl_hf.modeling.ops.triton_elementwise import MAX_FEATURES

    wide = CudaLike(torch.empty(8, 22016, device="meta", dtype=torch.bfloat16))
    half = CudaLike(torch.empty(8, 11008, device="meta", dtype=torch.bfloat16))
    weight = torch.empty(22016, device="meta", dtype=torch.bfloat16)
    with torch.no_grad():
        assert dispatch.decide("silu_glu", wide) == ("triton", None)
        assert dispatch.decide("silu_mul", half, half) == ("triton", None)
        name, reason = dispatch.decide("rms_norm", wide, weight, 1e-6)
        assert name == "compiled" and str(MAX_FEATURES) in reason
        assert dispatch.decide("silu_glu", CudaLike(torch.empty(8, 22016, device="meta", dtype=torch.int32)))[0] == "compiled"


def test_silu_glu_refuses_an_odd_width_as_its_definition_does():
    from infinitevl_hf.modeling.ops import triton_elementwise as T
    from infinitevl_hf.modeling.ops.elementwise import torch_silu_glu

    with pytest.raises(RuntimeError):
        torch_silu_glu(torch.randn(3, 7))
    with pytest.raises(ValueError, match="even last dim"):
        T.silu_glu(torch.randn(3, 7))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
def test_the_4b_joined_gate_up_of_a_batch_takes_the_silu_kernel_on_the_gpu():
    """What an 8-row decode step of InfiniteVL-4B gates: [8, 22016] through the package's kernel, not a compiled one,
    within bf16 rounding of the torch definition."""
    from infinitevl_hf.modeling.ops import dispatch
    from infinitevl_hf.modeling.ops.elementwise import silu_glu, torch_silu_glu

    gate_up = torch.randn(8, 22016, device="cuda", dtype=torch.bfloat16)
    assert dispatch.decide("silu_glu", gate_up) == ("triton", None)
    got, expected = silu_glu(gate_up).float(), torch_silu_glu(gate_up.float())
    assert ((got - expected).norm() / expected.norm()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()  # inference, where the module path takes the kernels
def test_kernels_match_their_torch_definitions_on_the_gpu():
    """bf16 at InfiniteVL-4B's widths, prompt and decode sizes: within bf16 rounding of the torch definition."""
    from infinitevl_hf.modeling.ops import elementwise as E
    from infinitevl_hf.modeling.ops import norms as N
    from infinitevl_hf.modeling.ops import triton_elementwise as T
    from infinitevl_hf.modeling.ops.causal_conv1d.reference import torch_causal_conv1d
    from infinitevl_hf.modeling.ops.causal_conv1d.triton_step import triton_conv1d_step
    from infinitevl_hf.modeling.ops.gated_delta_rule.reference import torch_fused_recurrent_gated_delta_rule, torch_gdn_gates
    from infinitevl_hf.modeling.ops.gated_delta_rule.triton_decode import triton_recurrent_one_token

    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    def close(fn, *args, **kwargs):
        """fn's kernel against its torch definition on the same bf16 inputs and on float32 ones."""
        name = fn.__name__.removeprefix("torch_")
        kernel, definition = getattr(T, name), fn
        assert dispatch.select(name, *args, **kwargs) == "triton", name  # what the module path runs
        exact = definition(*(a.float() if torch.is_tensor(a) else a for a in args), **kwargs)
        for got, eager, truth in zip(*(o if isinstance(o, tuple) else (o,) for o in
                                       (kernel(*args, **kwargs), definition(*args, **kwargs), exact))):
            assert got.shape == eager.shape and got.dtype == eager.dtype, fn.__name__
            # rounded once where eager rounds after every bf16 op: as close to float32 as eager
            assert rel(got, eager) < 1e-2 and rel(got, truth) <= 1.5 * rel(eager, truth) + 1e-3, (
                fn.__name__, rel(got, eager), rel(got, truth), rel(eager, truth))

    for rows in (1, 3328):
        x, delta = torch.randn(1, rows, 2048, device=dev, dtype=dt), torch.randn(1, rows, 2048, device=dev, dtype=dt)
        w = torch.rand(2048, device=dev, dtype=dt) + 0.5
        close(N.torch_rms_norm, x, w, 1e-6)
        close(N.torch_add_rms_norm, x, delta, w, 1e-6)
        o, gate = torch.randn(1, rows, 16, 256, device=dev, dtype=dt), torch.randn(1, rows, 16, 256, device=dev, dtype=dt)
        close(N.torch_gated_rms_norm, o, torch.rand(256, device=dev, dtype=dt) + 0.5, gate, 1e-5)
        g, u = torch.randn(1, rows, 11008, device=dev, dtype=dt), torch.randn(1, rows, 11008, device=dev, dtype=dt)
        close(E.torch_silu_mul, g, u)
        close(E.torch_silu_glu, torch.randn(1, rows, 6840, device=dev, dtype=dt))  # the vision MLP's joined product
        q = torch.randn(1, rows, 16, 128, device=dev, dtype=dt).transpose(1, 2)
        k = torch.randn(1, rows, 2, 128, device=dev, dtype=dt).transpose(1, 2)
        angles = torch.rand(1, rows, 128, device=dev) * 6.3
        close(E.torch_apply_rotary, q, k, angles.cos().to(dt), angles.sin().to(dt))
        a, b = torch.randn(1, rows, 16, device=dev, dtype=dt) * 8, torch.randn(1, rows, 16, device=dev, dtype=dt)
        close(torch_gdn_gates, a, b, torch.randn(16, device=dev), torch.randn(16, device=dev))

    for batch in (1, 8):
        x = torch.randn(batch, 1, 4096, device=dev, dtype=dt)
        cw, state = torch.randn(4096, 4, device=dev, dtype=dt), torch.randn(batch, 4096, 3, device=dev, dtype=dt)
        got, expected = triton_conv1d_step(x, cw, None, "silu", state, True), torch_causal_conv1d(x, cw, None, "silu", state, True)
        assert rel(got[0], expected[0]) < 1e-2  # both compute in float32 and round once
        assert (got[0] == expected[0]).float().mean() > 0.95
        assert torch.equal(got[1], expected[1])  # the shifted state is the inputs themselves
        q, k = torch.randn(batch, 1, 16, 128, device=dev, dtype=dt), torch.randn(batch, 1, 16, 128, device=dev, dtype=dt)
        v = torch.randn(batch, 1, 16, 256, device=dev, dtype=dt)
        g, beta = -torch.rand(batch, 1, 16, device=dev), torch.rand(batch, 1, 16, device=dev, dtype=dt)
        h0 = torch.randn(batch, 16, 128, 256, device=dev) * 0.1
        got = triton_recurrent_one_token(q, k, v, g, beta, None, h0, True, use_qk_l2norm_in_kernel=True)
        expected = torch_fused_recurrent_gated_delta_rule(q, k, v, g, beta, None, h0, True, use_qk_l2norm_in_kernel=True)
        assert rel(got[0], expected[0]) < 1e-2 and (got[0] == expected[0]).float().mean() > 0.95
        torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
def test_the_joined_conv_kernel_and_the_direct_launch_on_the_gpu():
    """q, k, v's convolutions of one token in one compiled launch equal the one-conv kernel's; and a kernel launched
    a second time with the same signature goes through the compiled kernel's launcher with the same results."""
    from infinitevl_hf.modeling.ops import triton_launch
    from infinitevl_hf.modeling.ops.causal_conv1d.triton_step import _conv_step3_kernel, triton_conv1d_step, triton_conv1d_step3
    from infinitevl_hf.modeling.ops.matvec.triton_matvec import _fused_matvec_kernel, fused_matvec

    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    sizes = (2048, 2048, 4096)
    for batch in (1, 8):
        row = torch.randn(batch, 1, 12320, device=dev, dtype=dt)  # a GDN layer's joined projection row
        xs = row[..., :sum(sizes)].split(sizes, dim=-1)
        weights = [torch.randn(d, 4, device=dev, dtype=dt) for d in sizes]
        states = [torch.randn(batch, d, 3, device=dev, dtype=dt) for d in sizes]
        expected = [triton_conv1d_step(x.contiguous(), w, None, "silu", s, True) for x, w, s in zip(xs, weights, states)]
        own = [s.clone() for s in states]
        for _ in range(2):  # the second call launches directly (same signature)
            mine = [s.clone() for s in states]
            joined = triton_conv1d_step3(xs, weights, (None,) * 3, mine)
        for got, final, (y, state) in zip(joined.split(sizes, dim=-1), mine, expected):
            assert torch.equal(got, y) and torch.equal(final, state)
        assert all(torch.equal(s, o) for s, o in zip(states, own))  # the inputs' states were left alone
    assert triton_launch.direct_launch_available() and _conv_step3_kernel in triton_launch._signatures

    x, weight = torch.randn(1, 2048, device=dev, dtype=dt), torch.randn(4096, 2048, device=dev, dtype=dt)
    first = fused_matvec(x, weight, glu=True)
    launched = [fused_matvec(x, weight, glu=True) for _ in range(3)]
    assert all(torch.equal(y, first) for y in launched)
    expected = torch.nn.functional.silu((x @ weight[:2048].T)) * (x @ weight[2048:].T)
    assert ((first.float() - expected.float()).norm() / expected.float().norm()).item() < 1e-2
    assert len(triton_launch._signatures[_fused_matvec_kernel]) >= 1
