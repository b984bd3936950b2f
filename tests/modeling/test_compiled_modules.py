"""The modules whose CUDA inference is compiled or re-expressed: on CPU they must compute what the transformers
modules they replace compute, keep their parameter names, and refuse what they cannot replace."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionPatchEmbed, Qwen2_5_VLRMSNorm, Qwen2MLP

from infinitevl_hf.modeling.ops.dispatch import cuda_inference_op
from infinitevl_hf.modeling.mlp import InfiniteVLMLP
from infinitevl_hf.modeling.rms_norm import InfiniteVLRMSNorm
from infinitevl_hf.speed.vision.patch_embed import InfiniteVLVisionPatchEmbed, use_linear_patch_embed


def test_patch_embed_as_a_product_equals_the_conv():
    torch.manual_seed(0)
    conv = Qwen2_5_VisionPatchEmbed(patch_size=14, temporal_patch_size=2, in_channels=3, embed_dim=32)
    pixels = torch.randn(10, 3 * 2 * 14 * 14)
    expected = conv(pixels)
    holder = torch.nn.Module()
    holder.patch_embed = conv
    use_linear_patch_embed(holder)
    assert type(holder.patch_embed) is InfiniteVLVisionPatchEmbed
    assert [n for n, _ in holder.named_parameters()] == ["patch_embed.proj.weight"]
    torch.testing.assert_close(holder.patch_embed(pixels), expected, rtol=1e-5, atol=1e-5)
    # the conv's own input layout [N, C, T, P, P] flattens to the same patches
    torch.testing.assert_close(holder.patch_embed(pixels.view(10, 3, 2, 14, 14)), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not split into patches of 1176"):
        holder.patch_embed(torch.randn(10, 1000))


def test_linear_patch_embed_refuses_a_strided_conv_that_is_not_a_product():
    holder = torch.nn.Module()
    holder.patch_embed = Qwen2_5_VisionPatchEmbed(patch_size=14, temporal_patch_size=2, in_channels=3, embed_dim=8)
    holder.patch_embed.proj.stride = (1, 7, 7)
    with pytest.raises(ValueError, match="stride equals its kernel"):
        use_linear_patch_embed(holder)
    holder.patch_embed = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="Qwen2_5_VisionPatchEmbed"):
        use_linear_patch_embed(holder)


def test_decoder_uses_the_compiled_modules_with_the_parent_parameters():
    from helpers import tiny_model

    model = tiny_model()
    layer = model.model.language_model.layers[0]
    assert type(layer.mlp) is InfiniteVLMLP and type(layer.input_layernorm) is InfiniteVLRMSNorm
    assert type(model.model.language_model.norm) is InfiniteVLRMSNorm
    assert type(model.model.visual.patch_embed) is InfiniteVLVisionPatchEmbed
    names = {n for n, _ in layer.named_parameters()}
    assert {"mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"} <= names


def _mlp_and_input():
    from helpers import tiny_config

    config = tiny_config().text_config
    torch.manual_seed(0)
    mlp = InfiniteVLMLP(config).to(torch.bfloat16)
    x = torch.randn(2, 7, config.hidden_size, dtype=torch.bfloat16)
    return config, mlp, x


def test_mlp_equals_the_transformers_module():
    _, mlp, x = _mlp_and_input()
    torch.testing.assert_close(mlp(x), Qwen2MLP.forward(mlp, x), rtol=0, atol=0)


def test_norm_equals_the_transformers_module():
    config, _, x = _mlp_and_input()
    norm = InfiniteVLRMSNorm(config.hidden_size, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_()
    torch.testing.assert_close(norm(x), Qwen2_5_VLRMSNorm.forward(norm, x), rtol=0, atol=0)


def _compiled_double():
    """cuda_inference_op over a function that doubles its input and records each call's shape."""
    calls = []

    def double(x):
        calls.append(x.shape)
        return 2 * x

    return cuda_inference_op(double), calls


def test_cuda_inference_op_keeps_the_function_name():
    run, _ = _compiled_double()
    assert run.__name__ == "double"


def test_cuda_inference_op_computes_the_function_with_autograd():
    run, _ = _compiled_double()
    x = torch.randn(3, 4, requires_grad=True)
    torch.testing.assert_close(run(x), 2 * x)  # autograd on, CPU: no compile, the function runs


def test_cuda_inference_op_computes_the_function_under_no_grad_off_cuda():
    run, _ = _compiled_double()
    x = torch.randn(3, 4, requires_grad=True)
    with torch.no_grad():
        torch.testing.assert_close(run(x), 2 * x)


def test_cuda_inference_op_runs_the_function_itself_off_cuda_with_autograd_or_without():
    run, calls = _compiled_double()
    x = torch.randn(3, 4, requires_grad=True)
    run(x)  # autograd on, CPU: no compile, the function runs
    with torch.no_grad():
        run(x)
    assert calls == [(3, 4), (3, 4)]


def test_silu_mul_matches_the_activation():
    from infinitevl_hf.modeling.ops.elementwise import silu_mul

    g, u = torch.randn(4, 6), torch.randn(4, 6)
    torch.testing.assert_close(silu_mul(g, u), F.silu(g) * u)


def test_norm_joined_with_the_add_before_it_equals_the_add_then_the_norm():
    torch.manual_seed(1)
    norm = InfiniteVLRMSNorm(16, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_()
    residual, delta = torch.randn(3, 5, 16, dtype=torch.bfloat16), torch.randn(3, 5, 16, dtype=torch.bfloat16)
    hidden, normed = norm.add_then_norm(residual, delta)
    torch.testing.assert_close(hidden, residual + delta, rtol=0, atol=0)
    torch.testing.assert_close(normed, Qwen2_5_VLRMSNorm.forward(norm, residual + delta), rtol=0, atol=0)


def test_vision_block_with_the_joined_norm_equals_the_transformers_block():
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionBlock

    from helpers import tiny_model
    from infinitevl_hf.speed.vision.block import InfiniteVLVisionBlock, use_add_norm_vision_blocks

    model = tiny_model()
    visual = model.model.visual
    assert all(type(block) is InfiniteVLVisionBlock for block in visual.blocks)
    grid = torch.tensor([[1, 8, 8]])
    cfg = visual.config
    pixels = torch.randn(64, cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2)
    with torch.no_grad():
        fused = visual(pixels, grid_thw=grid).pooler_output
        for block in visual.blocks:
            block.__class__ = Qwen2_5_VLVisionBlock
        plain = visual(pixels, grid_thw=grid).pooler_output
        use_add_norm_vision_blocks(visual)  # swapping back works too
    torch.testing.assert_close(fused, plain, rtol=0, atol=0)
    assert all(type(block) is InfiniteVLVisionBlock for block in visual.blocks)
    visual.blocks[0].norm2 = torch.nn.LayerNorm(4)
    with pytest.raises(TypeError, match="expected Qwen2_5_VLRMSNorm in the vision blocks, got LayerNorm"):
        use_add_norm_vision_blocks(visual)
