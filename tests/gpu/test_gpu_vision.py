"""On CUDA, the vision tower's inference path (zero-padded MLP, compiled norms joined with the residual add,
the Triton rotary kernel, compiled SiLU gate) gives
what the plain transformers modules give, on the released 4B vision config."""

import copy
import json
import os
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

OFFICIAL = Path(__file__).resolve().parents[1] / "data" / "official_config.json"


def test_fast_vision_inference_matches_the_plain_modules():
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from infinitevl_hf import InfiniteVLConfig
    from infinitevl_hf.speed.vision.attention import use_batched_vision_attention
    from infinitevl_hf.speed.vision.mlp import use_padded_vision_mlp
    from infinitevl_hf.speed.vision.block import use_add_norm_vision_blocks

    config = InfiniteVLConfig(**json.loads(OFFICIAL.read_text())).vision_config
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        reference = Qwen2_5_VisionTransformerPretrainedModel._from_config(config).eval()  # float32, plain modules
    tower = copy.deepcopy(reference).to(torch.bfloat16)
    grid = torch.tensor([[8, 32, 32]], device="cuda")  # 16 frames of 448x448 as video patches
    pixels = torch.randn(8 * 32 * 32, 3 * 2 * 14 * 14, device="cuda")
    with torch.no_grad():
        expected = reference(pixels, grid_thw=grid).pooler_output.float()
    del reference
    pixels = pixels.to(torch.bfloat16)
    use_batched_vision_attention(tower)
    with torch.enable_grad():  # autograd on: every swapped module takes the plain path
        plain = tower(pixels, grid_thw=grid).pooler_output.float()
    use_padded_vision_mlp(tower)
    use_add_norm_vision_blocks(tower)
    with torch.no_grad():
        fast = tower(pixels, grid_thw=grid).pooler_output.float()
        fast_again = tower(pixels, grid_thw=grid).pooler_output.float()
    assert tower.blocks[0].mlp._padded_layout[0].shape[0] % 128 == 0

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    errors = {"fast_vs_fp32": rel(fast, expected), "plain_bf16_vs_fp32": rel(plain, expected), "fast_vs_plain": rel(fast, plain)}
    path = os.environ.get("INFINITEVL_GPU_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": "vision_fast_path_bf16", **errors}) + "\n")
    # bf16 rounding alone moves a random 32-block tower by a few percent: the fast path must be as close to
    # float32 as the plain bf16 modules are
    assert errors["fast_vs_fp32"] <= 1.2 * errors["plain_bf16_vs_fp32"] + 1e-3, errors
    torch.testing.assert_close(fast_again, fast, rtol=0, atol=0)
