"""Full-size InfiniteVL-4B (random weights) on CUDA: fla fast path vs torch reference, CUDA-graph decode vs eager.

Marked `gpu`; skipped only where CUDA is absent. Measured errors are appended to
$INFINITEVL_GPU_REPORT (a JSON-lines file) when that variable is set.
"""

import json
import os
from pathlib import Path

import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytestmark = [pytest.mark.gpu, needs_cuda]

OFFICIAL = Path(__file__).resolve().parents[1] / "data" / "official_config.json"


def _report(**row):
    path = os.environ.get("INFINITEVL_GPU_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


@pytest.fixture(scope="module")
def model():
    from infinitevl_hf import InfiniteVLConfig, InfiniteVLForConditionalGeneration

    config = InfiniteVLConfig(**json.loads(OFFICIAL.read_text()))
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = InfiniteVLForConditionalGeneration(config)
    return model.to(torch.bfloat16).eval()


def _fla_available() -> bool:
    from infinitevl_hf.modeling.ops.backend import select_backend

    probe = torch.zeros(1, device="cuda")
    return select_backend("chunk_gated_delta_rule", probe) == "fla"


def test_fla_path_matches_torch_reference_on_4k_tokens(model, monkeypatch):
    """The same bf16 model with fla kernels and with the torch reference kernels; fp32 torch as the yardstick."""
    if not _fla_available():
        pytest.skip("fla is not installed on this CUDA machine")
    ids = torch.randint(0, 151000, (1, 4096), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad():
        fast = model(input_ids=ids, use_cache=False).logits.float()
        monkeypatch.setenv("INFINITEVL_DISABLE_FLA", "1")
        torch_bf16 = model(input_ids=ids, use_cache=False).logits.float()
        fp32 = model.float()(input_ids=ids, use_cache=False).logits.float()
        model.to(torch.bfloat16)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    kernel_err, fla_vs_fp32, torch_bf16_vs_fp32 = rel(fast, torch_bf16), rel(fast, fp32), rel(torch_bf16, fp32)
    _report(test="logits_4k_tokens", fla_bf16_vs_torch_bf16=kernel_err, fla_bf16_vs_torch_fp32=fla_vs_fp32,
            torch_bf16_vs_torch_fp32=torch_bf16_vs_fp32)
    # With random weights, bf16 rounding alone moves the logits of this 36-layer model by ~5% (measured on an
    # H200: torch bf16 vs torch fp32 5.2e-2), so two bf16 runs that differ only in kernels differ by a few
    # percent too. The property that holds is that the fast path is as accurate as the reference in bf16.
    assert torch.isfinite(fast).all()
    assert fla_vs_fp32 < 1.1 * torch_bf16_vs_fp32 + 1e-3, (fla_vs_fp32, torch_bf16_vs_fp32)


def test_cuda_graph_decode_equals_eager_for_64_tokens(model):
    ids = torch.randint(0, 151000, (1, 1000), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    with torch.no_grad():
        eager = model.generate(ids, max_new_tokens=64, do_sample=False)
        graph = model.generate(ids, max_new_tokens=64, do_sample=False, cache_implementation="static")
    same = (eager == graph).float().mean().item()
    _report(test="cuda_graph_vs_eager_64_greedy_tokens", identical_fraction=same)
    assert torch.equal(eager, graph)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fla_kernels_match_the_torch_reference(dtype):
    if not _fla_available():
        pytest.skip("fla is not installed on this CUDA machine")
    from infinitevl_hf.modeling.ops import (
        chunk_gated_delta_rule,
        fused_recurrent_gated_delta_rule,
        torch_chunk_gated_delta_rule,
        torch_fused_recurrent_gated_delta_rule,
    )

    torch.manual_seed(3)
    B, T, H, K, V = 1, 4096, 16, 128, 256
    q, k = (torch.randn(B, T, H, K, device="cuda", dtype=dtype) for _ in range(2))
    v = torch.randn(B, T, H, V, device="cuda", dtype=dtype)
    g = -torch.nn.functional.softplus(torch.randn(B, T, H, device="cuda")) * 0.1
    beta = torch.rand(B, T, H, device="cuda").sigmoid()
    h0 = torch.randn(B, H, K, V, device="cuda") * 0.1
    args = dict(initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    upcast = [x.float() for x in (q, k, v)]
    for name, fast, ref, length in (
        ("chunk", chunk_gated_delta_rule, torch_chunk_gated_delta_rule, T),
        ("fused_recurrent", fused_recurrent_gated_delta_rule, torch_fused_recurrent_gated_delta_rule, 256),
    ):
        cut = lambda x: x[:, :length]  # noqa: E731 - the recurrent reference is a python loop over tokens
        o, ht = fast(cut(q), cut(k), cut(v), g=cut(g), beta=cut(beta), **args)
        o_ref, ht_ref = ref(*(cut(x) for x in upcast), g=cut(g), beta=cut(beta), **args)
        err_o = ((o.float() - o_ref).norm() / o_ref.norm()).item()
        err_h = ((ht - ht_ref).norm() / ht_ref.norm()).item()
        _report(test=f"fla_{name}_vs_torch", dtype=str(dtype), tokens=length, o_relative_error=err_o, state_relative_error=err_h)
        limit = 1e-2 if dtype == torch.bfloat16 else 5e-3
        assert err_o < limit and err_h < limit, (name, err_o, err_h)
