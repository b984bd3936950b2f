"""Vision speed-ups that read weights directly (the padded MLP, the patch embedding as one product) serve only plain
float layers; LoRA layers and quantized weights keep the module's own forward, so the adapter is applied and no
unsupported op runs on a quantized tensor."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionPatchEmbed

from infinitevl_hf.speed.vision.mlp import InfiniteVLVisionMLP


def _vision():
    torch.manual_seed(0)
    return tiny_model().model.visual


def test_a_plain_vision_mlp_pads():
    assert _vision().blocks[0].mlp.pads()


def test_a_quantized_vision_mlp_does_not_pad():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    visual = _vision()
    quantize_(visual, Int8WeightOnlyConfig(version=2))
    assert not visual.blocks[0].mlp.pads()


def test_laying_out_a_quantized_vision_mlp_leaves_it_as_it_is():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    visual = _vision()
    quantize_(visual, Int8WeightOnlyConfig(version=2))
    mlp = visual.blocks[0].mlp
    weight = mlp.gate_proj.weight
    mlp.lay_out()  # (it used to call new_zeros on the quantized weight, which torchao does not implement)
    assert mlp.gate_proj.weight is weight and getattr(mlp, "_padded_layout", None) is None


def test_a_lora_vision_mlp_does_not_pad():
    from peft import LoraConfig, inject_adapter_in_model

    visual = _vision()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["gate_proj"], init_lora_weights=False), visual)
    mlp = visual.blocks[0].mlp
    assert isinstance(mlp, InfiniteVLVisionMLP) and not mlp.pads()


def test_a_laid_out_vision_mlp_lets_go_of_its_padded_buffers_once_quantized():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    visual = _vision()
    mlp = visual.blocks[0].mlp
    mlp.lay_out()
    assert mlp._padded_layout is not None
    quantize_(visual, Int8WeightOnlyConfig(version=2))
    mlp.lay_out()
    assert getattr(mlp, "_padded_layout", None) is None


def test_a_vision_mlp_with_a_hooked_projection_does_not_pad():
    mlp = _vision().blocks[0].mlp
    mlp.up_proj.register_forward_hook(lambda module, args, out: out + 1)
    assert not mlp.pads()


def test_offloaded_weights_are_not_read_directly():
    from infinitevl_hf.speed.retype import reads_plain_weights

    assert reads_plain_weights(torch.nn.Linear(2, 2), torch.nn.Linear)
    assert not reads_plain_weights(torch.nn.Linear(2, 2, device="meta"), torch.nn.Linear)


@pytest.mark.parametrize("kind", ["lora", "hook", "plain"])
def test_the_patch_embedding_gives_what_its_conv_gives(kind):
    from peft import LoraConfig, inject_adapter_in_model

    visual = _vision()
    if kind == "lora":
        inject_adapter_in_model(LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False), visual.patch_embed)
    if kind == "hook":
        visual.patch_embed.proj.register_forward_hook(lambda module, args, out: out + 1)
    embed = visual.patch_embed
    pixels = torch.randn(8, embed.in_channels * embed.temporal_patch_size * embed.patch_size**2)
    with torch.no_grad():
        got = embed(pixels)
        expected = Qwen2_5_VisionPatchEmbed.forward(embed, pixels)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
