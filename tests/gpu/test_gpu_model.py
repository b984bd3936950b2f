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
    if not _fla_available():
        pytest.skip("fla is not installed on this CUDA machine")
    ids = torch.randint(0, 151000, (1, 4096), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad():
        fast = model(input_ids=ids, use_cache=False).logits.float()
        monkeypatch.setenv("INFINITEVL_DISABLE_FLA", "1")
        reference = model.float()(input_ids=ids, use_cache=False).logits.float()
        model.to(torch.bfloat16)
    err = ((fast - reference).norm() / reference.norm()).item()
    _report(test="fla_bf16_vs_torch_fp32_logits_4k", relative_error=err)
    assert err < 1e-2, err


def test_cuda_graph_decode_equals_eager_for_64_tokens(model):
    ids = torch.randint(0, 151000, (1, 1000), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    with torch.no_grad():
        eager = model.generate(ids, max_new_tokens=64, do_sample=False)
        graph = model.generate(ids, max_new_tokens=64, do_sample=False, cache_implementation="static")
    same = (eager == graph).float().mean().item()
    _report(test="cuda_graph_vs_eager_64_greedy_tokens", identical_fraction=same)
    assert torch.equal(eager, graph)
