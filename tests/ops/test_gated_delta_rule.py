"""Torch gated delta rule paths against the per-token ground truth (CPU)."""

import pytest
import torch
import torch.nn.functional as F

from infinitevl_hf.modeling.ops import (
    chunk_gated_delta_rule,
    fused_recurrent_gated_delta_rule,
    torch_chunk_gated_delta_rule,
    torch_fused_recurrent_gated_delta_rule,
    torch_naive_gated_delta_rule,
)
from infinitevl_hf.modeling.ops import dispatch as backend_mod


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(B, T, H, K, V, dtype=torch.float32, normalize_k=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    if normalize_k:  # keeps beta * |k|^2 < 2, the regime where the delta rule is stable
        k = F.normalize(k, dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    # realistic decays: -softplus-like, clamped to [-5, 0]
    g = (-F.softplus(torch.randn(B, T, H, generator=gen) * 2)).clamp(min=-5.0)
    beta = torch.rand(B, T, H, generator=gen).clamp(0.01, 0.99)
    h0 = torch.randn(B, H, K, V, generator=gen)
    return [t.to(dtype) for t in (q, k, v, g, beta)], h0


CASES = [
    pytest.param(B, T, H, K, V, id=f"B{B}-T{T}-H{H}-K{K}-V{V}")
    for (B, T, H, K, V) in [
        (1, 1, 1, 16, 32),
        (2, 63, 3, 16, 32),
        (1, 64, 1, 16, 32),
        (2, 65, 3, 16, 32),
        (1, 200, 3, 16, 32),
        (2, 200, 1, 32, 16),
    ]
]
FAST = [torch_chunk_gated_delta_rule, torch_fused_recurrent_gated_delta_rule]


@pytest.mark.parametrize("fn", FAST, ids=["chunk", "fused_recurrent"])
@pytest.mark.parametrize("use_h0", [False, True], ids=["no_h0", "h0"])
@pytest.mark.parametrize("l2", [False, True], ids=["raw", "l2norm"])
@pytest.mark.parametrize("B,T,H,K,V", CASES)
def test_matches_naive(fn, use_h0, l2, B, T, H, K, V):
    (q, k, v, g, beta), h0 = make_inputs(B, T, H, K, V, normalize_k=not l2)
    if l2:  # unnormalised q/k: the kernel-side l2norm must make this stable
        q, k = q * 3, k * 3
    h0 = h0 if use_h0 else None
    kw = dict(initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=l2)
    ref_o, ref_h = torch_naive_gated_delta_rule(*(t.double() for t in (q, k, v, g, beta)),
                                                initial_state=h0.double() if use_h0 else None,
                                                output_final_state=True, use_qk_l2norm_in_kernel=l2)
    o, ht = fn(q, k, v, g, beta, **kw)
    assert o.shape == (B, T, H, V) and o.dtype == torch.float32
    assert ht.shape == (B, H, K, V) and ht.dtype == torch.float32
    assert rel(o, ref_o) < 1e-5
    assert rel(ht, ref_h) < 1e-5


@pytest.mark.parametrize("fn", FAST + [torch_naive_gated_delta_rule], ids=["chunk", "fused_recurrent", "naive"])
def test_final_state_only_when_asked(fn):
    (q, k, v, g, beta), _ = make_inputs(1, 5, 2, 8, 8)
    o, ht = fn(q, k, v, g, beta)
    assert ht is None and o.shape == (1, 5, 2, 8)


def test_default_scale_is_inverse_sqrt_k():
    (q, k, v, g, beta), _ = make_inputs(1, 20, 2, 16, 8)
    o_default, _ = torch_chunk_gated_delta_rule(q, k, v, g, beta)
    o_explicit, _ = torch_chunk_gated_delta_rule(q, k, v, g, beta, scale=16 ** -0.5)
    o_other, _ = torch_chunk_gated_delta_rule(q, k, v, g, beta, scale=1.0)
    torch.testing.assert_close(o_default, o_explicit)
    assert rel(o_other, o_default) > 0.5


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_chunk_size_does_not_change_result(chunk_size):
    (q, k, v, g, beta), h0 = make_inputs(2, 100, 2, 16, 32)
    ref_o, ref_h = torch_naive_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o, ht = torch_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                         chunk_size=chunk_size)
    assert rel(o, ref_o) < 1e-5 and rel(ht, ref_h) < 1e-5


@pytest.mark.parametrize("fn", FAST, ids=["chunk", "fused_recurrent"])
@pytest.mark.parametrize("split", [1, 64, 77])
def test_split_equals_one_call(fn, split):
    (q, k, v, g, beta), h0 = make_inputs(2, 150, 3, 16, 32)
    o_full, h_full = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    first = [t[:, :split] for t in (q, k, v, g, beta)]
    second = [t[:, split:] for t in (q, k, v, g, beta)]
    o1, h1 = fn(*first, initial_state=h0, output_final_state=True)
    o2, h2 = fn(*second, initial_state=h1, output_final_state=True)
    assert rel(torch.cat([o1, o2], dim=1), o_full) < 1e-5
    assert rel(h2, h_full) < 1e-5


def test_prefill_then_decode_steps():
    # chunk prefill followed by T=1 fused_recurrent steps == one chunk call
    (q, k, v, g, beta), h0 = make_inputs(1, 70, 2, 16, 32)
    o_full, h_full = torch_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    outs = []
    o, h = torch_chunk_gated_delta_rule(*(t[:, :66] for t in (q, k, v, g, beta)), initial_state=h0,
                                        output_final_state=True)
    outs.append(o)
    for t in range(66, 70):
        o, h = torch_fused_recurrent_gated_delta_rule(*(x[:, t : t + 1] for x in (q, k, v, g, beta)),
                                                      initial_state=h, output_final_state=True)
        outs.append(o)
    assert rel(torch.cat(outs, dim=1), o_full) < 1e-5
    assert rel(h, h_full) < 1e-5


@pytest.mark.parametrize("fn", FAST + [torch_naive_gated_delta_rule], ids=["chunk", "fused_recurrent", "naive"])
@pytest.mark.parametrize("use_h0", [False, True], ids=["no_h0", "h0"])
def test_cu_seqlens_equals_separate_runs(fn, use_h0):
    lens = [70, 1, 33]
    seqs = [make_inputs(1, n, 2, 16, 32, seed=i) for i, n in enumerate(lens)]
    h0s = torch.cat([h for _, h in seqs]) if use_h0 else None
    packed = [torch.cat([s[0][j] for s in seqs], dim=1) for j in range(5)]
    cu = torch.tensor([0, 70, 71, 104], dtype=torch.long)
    o, ht = fn(*packed, initial_state=h0s, output_final_state=True, cu_seqlens=cu)
    assert ht.shape == (3, 2, 16, 32)
    for i, ((inputs, h0), bos, eos) in enumerate(zip(seqs, cu[:-1].tolist(), cu[1:].tolist())):
        o_i, h_i = torch_naive_gated_delta_rule(*inputs, initial_state=h0 if use_h0 else None,
                                                output_final_state=True)
        assert rel(o[:, bos:eos], o_i) < 1e-5
        assert rel(ht[i], h_i[0]) < 1e-5


def test_cu_seqlens_bad_input_is_named():
    (q, k, v, g, beta), _ = make_inputs(2, 10, 1, 8, 8)
    with pytest.raises(ValueError, match="batch size must be 1"):
        torch_chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="initial_state"):
        torch_chunk_gated_delta_rule(q[:1], k[:1], v[:1], g[:1], beta[:1],
                                     initial_state=torch.zeros(1, 1, 8, 8), cu_seqlens=torch.tensor([0, 4, 10]))


@pytest.mark.parametrize("fn", FAST, ids=["chunk", "fused_recurrent"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_inputs(fn, dtype):
    (q, k, v, g, beta), h0 = make_inputs(2, 130, 2, 16, 32, dtype=dtype)
    ref_o, ref_h = torch_naive_gated_delta_rule(*(t.float() for t in (q, k, v, g, beta)), initial_state=h0,
                                                output_final_state=True)
    o, ht = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert o.dtype == dtype and ht.dtype == torch.float32
    assert rel(o, ref_o) < 1e-2 and rel(ht, ref_h) < 1e-2


@pytest.mark.parametrize("fn", FAST, ids=["chunk", "fused_recurrent"])
def test_gradients_match_naive(fn):
    (q, k, v, g, beta), h0 = make_inputs(1, 70, 2, 8, 16)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, g, beta, h0)]
    ref_leaves = [t.double().clone().requires_grad_() for t in (q, k, v, g, beta, h0)]
    gen = torch.Generator().manual_seed(1)
    do, dh = torch.randn(1, 70, 2, 16, generator=gen), torch.randn(1, 2, 8, 16, generator=gen)

    o, ht = fn(*leaves[:5], initial_state=leaves[5], output_final_state=True, use_qk_l2norm_in_kernel=True)
    ((o * do).sum() + (ht * dh).sum()).backward()
    ref_o, ref_h = torch_naive_gated_delta_rule(*ref_leaves[:5], initial_state=ref_leaves[5],
                                                output_final_state=True, use_qk_l2norm_in_kernel=True)
    ((ref_o * do.double()).sum() + (ref_h * dh.double()).sum()).backward()
    for name, a, b in zip(["dq", "dk", "dv", "dg", "dbeta", "dh0"], leaves, ref_leaves):
        assert a.grad is not None and torch.isfinite(a.grad).all(), name
        assert rel(a.grad, b.grad) < 1e-4, name


def test_chunk_gradcheck_float64():
    (q, k, v, g, beta), h0 = make_inputs(1, 9, 1, 4, 3)
    args = [t.double().requires_grad_() for t in (q, k, v, g, beta, h0)]

    def f(q, k, v, g, beta, h0):
        return torch_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                            chunk_size=4)

    assert torch.autograd.gradcheck(f, args)


def test_dispatchers_use_torch_on_cpu_even_if_fla_loads(monkeypatch):
    # Pretend fla imported fine: CPU tensors must still take the torch path.
    sentinel = object()
    monkeypatch.setitem(backend_mod._FLA_LOADERS, "chunk_gated_delta_rule", lambda: (sentinel, None))
    monkeypatch.setitem(backend_mod._FLA_LOADERS, "fused_recurrent_gated_delta_rule", lambda: (sentinel, None))
    (q, k, v, g, beta), h0 = make_inputs(1, 20, 2, 8, 8)
    assert backend_mod.select("chunk_gated_delta_rule", q, k, v, g, beta) == "torch"
    for disp, ref in [(chunk_gated_delta_rule, torch_chunk_gated_delta_rule),
                      (fused_recurrent_gated_delta_rule, torch_fused_recurrent_gated_delta_rule)]:
        o, ht = disp(q, k, v, g, beta, initial_state=h0, output_final_state=True)
        o_ref, ht_ref = ref(q, k, v, g, beta, initial_state=h0, output_final_state=True)
        torch.testing.assert_close(o, o_ref)
        torch.testing.assert_close(ht, ht_ref)


class _FakeCuda:
    is_cuda = True
    device = "cuda:0"

    def __init__(self, requires_grad: bool = False):
        self.requires_grad = requires_grad


def test_training_avoids_an_unreliable_fla_backward(monkeypatch):
    op = "chunk_gated_delta_rule"
    monkeypatch.delenv(backend_mod.DISABLE_ENV, raising=False)
    monkeypatch.setitem(backend_mod._FLA_LOADERS, op, lambda: (object(), None))
    monkeypatch.setattr(backend_mod, "fla_backward_problem", lambda device: "fla's backward is unreliable here")
    assert backend_mod.select(op, _FakeCuda(requires_grad=False)) == "fla"  # inference is unaffected
    backend, reason = backend_mod.decide(op, _FakeCuda(requires_grad=True))
    assert backend == "torch" and "unreliable" in reason
    with torch.no_grad():
        assert backend_mod.select(op, _FakeCuda(requires_grad=True)) == "fla"


def test_backend_choice_rules(monkeypatch):
    op = "chunk_gated_delta_rule"
    cuda = _FakeCuda()
    monkeypatch.delenv(backend_mod.DISABLE_ENV, raising=False)
    monkeypatch.setitem(backend_mod._FLA_LOADERS, op, lambda: (object(), None))
    assert backend_mod.select(op, cuda, None, cuda) == "fla"
    assert backend_mod.select(op, cuda, torch.zeros(1)) == "torch"  # one CPU tensor is enough
    monkeypatch.setenv(backend_mod.DISABLE_ENV, "1")
    assert backend_mod.select(op, cuda) == "torch"
    assert backend_mod.decide(op, cuda)[1] == f"{backend_mod.DISABLE_ENV} is set"
    monkeypatch.setenv(backend_mod.DISABLE_ENV, "0")
    assert backend_mod.select(op, cuda) == "fla"
    monkeypatch.setitem(backend_mod._FLA_LOADERS, op, lambda: (None, "cannot import fla: boom"))
    backend, reason = backend_mod.decide(op, cuda)
    assert backend == "torch" and "boom" in reason
