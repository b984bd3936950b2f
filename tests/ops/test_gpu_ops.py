"""fla fast paths (via the dispatchers) against the torch reference on a CUDA GPU."""

import pytest
import torch
import torch.nn.functional as F

from infinitevl_hf.modeling.ops import (
    causal_conv1d,
    chunk_gated_delta_rule,
    fused_recurrent_gated_delta_rule,
    torch_causal_conv1d,
    torch_chunk_gated_delta_rule,
    torch_fused_recurrent_gated_delta_rule,
)
from infinitevl_hf.modeling.ops.dispatch import fla_disabled
from infinitevl_hf.modeling.ops.dispatch import select as select_backend
from infinitevl_hf.modeling.ops.causal_conv1d.cuda import load_fla_causal_conv1d
from infinitevl_hf.modeling.ops.gated_delta_rule.cuda import load_fla_gated_delta_rule


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _need_fla(loader):
    kernels, reason = loader()
    if kernels is None:  # legitimate: the fast path under test does not exist on this machine
        pytest.skip(f"fla is not importable here: {reason}")
    if fla_disabled():
        pytest.skip("INFINITEVL_DISABLE_FLA is set")


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def gdn_inputs(B, T, H, K, V, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, T, H, K, device="cuda", generator=gen)
    k = F.normalize(torch.randn(B, T, H, K, device="cuda", generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, device="cuda", generator=gen)
    g = (-F.softplus(torch.randn(B, T, H, device="cuda", generator=gen) * 2)).clamp(min=-5.0)
    beta = torch.rand(B, T, H, device="cuda", generator=gen)
    h0 = torch.randn(B, H, K, V, device="cuda", generator=gen)
    return [t.to(dtype) for t in (q, k, v, g, beta)], h0


TOL = {torch.float32: 5e-3, torch.bfloat16: 1e-2}  # fp32 kernels use tf32 matmuls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("l2", [False, True], ids=["raw", "l2norm"])
def test_chunk_matches_reference(dtype, l2):
    _need_fla(load_fla_gated_delta_rule)
    (q, k, v, g, beta), h0 = gdn_inputs(1, 4000, 16, 128, 256, dtype)
    assert select_backend("chunk_gated_delta_rule", q, k, v, g, beta) == "fla"
    o, ht = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                   use_qk_l2norm_in_kernel=l2)
    o_ref, ht_ref = torch_chunk_gated_delta_rule(*(t.float() for t in (q, k, v, g, beta)), initial_state=h0,
                                                 output_final_state=True, use_qk_l2norm_in_kernel=l2)
    assert o.dtype == dtype and ht.dtype == torch.float32
    assert rel(o, o_ref) < TOL[dtype]
    assert rel(ht, ht_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunk_cu_seqlens_matches_reference(dtype):
    _need_fla(load_fla_gated_delta_rule)
    (q, k, v, g, beta), _ = gdn_inputs(1, 3000, 16, 128, 256, dtype)
    h0 = torch.randn(3, 16, 128, 256, device="cuda")
    cu = torch.tensor([0, 1000, 1001, 3000], device="cuda", dtype=torch.long)
    o, ht = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    o_ref, ht_ref = torch_chunk_gated_delta_rule(*(t.float() for t in (q, k, v, g, beta)), initial_state=h0,
                                                 output_final_state=True, cu_seqlens=cu)
    assert rel(o, o_ref) < TOL[dtype] and rel(ht, ht_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 512])
def test_fused_recurrent_matches_reference(dtype, T):
    _need_fla(load_fla_gated_delta_rule)
    (q, k, v, g, beta), h0 = gdn_inputs(2, T, 16, 128, 256, dtype)
    o, ht = fused_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                             use_qk_l2norm_in_kernel=True)
    o_ref, ht_ref = torch_fused_recurrent_gated_delta_rule(*(t.float() for t in (q, k, v, g, beta)),
                                                           initial_state=h0, output_final_state=True,
                                                           use_qk_l2norm_in_kernel=True)
    assert o.dtype == dtype
    assert rel(o, o_ref) < TOL[dtype] and rel(ht, ht_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [2, 3000])
def test_causal_conv1d_matches_reference(dtype, T):
    _need_fla(load_fla_causal_conv1d)
    D, W = 2048, 4
    x = torch.randn(2, T, D, device="cuda").to(dtype)
    w, b = torch.randn(D, W, device="cuda").to(dtype), torch.randn(D, device="cuda").to(dtype)
    h0 = torch.randn(2, D, W - 1, device="cuda").to(dtype)
    assert select_backend("causal_conv1d", x, w) == "fla"
    y, s = causal_conv1d(x, w, b, initial_state=h0, output_final_state=True)
    y_ref, s_ref = torch_causal_conv1d(x, w, b, initial_state=h0, output_final_state=True)
    assert rel(y, y_ref) < TOL[dtype]
    torch.testing.assert_close(s, s_ref)  # the state is a copy of inputs: exact


def test_causal_conv1d_cu_seqlens_matches_reference():
    _need_fla(load_fla_causal_conv1d)
    D, W = 256, 4
    x = torch.randn(1, 300, D, device="cuda")
    w, b = torch.randn(D, W, device="cuda"), torch.randn(D, device="cuda")
    h0 = torch.randn(3, D, W - 1, device="cuda")
    cu = torch.tensor([0, 2, 100, 300], device="cuda", dtype=torch.long)
    y, s = causal_conv1d(x, w, b, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    y_ref, s_ref = torch_causal_conv1d(x, w, b, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert rel(y, y_ref) < TOL[torch.float32]
    torch.testing.assert_close(s, s_ref)
