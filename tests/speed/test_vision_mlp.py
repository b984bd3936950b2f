"""The zero-padded vision MLP computes what transformers' MLP computes, and keeps its parameters ordinary."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_config
from safetensors.torch import load_file, save_file
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLMLP

from infinitevl_hf.speed.vision.mlp import PAD_MULTIPLE, InfiniteVLVisionMLP, use_padded_vision_mlp


def mlp(seed: int = 0, act: str | None = None) -> InfiniteVLVisionMLP:
    torch.manual_seed(seed)
    config = copy.deepcopy(tiny_config().vision_config)
    assert config.intermediate_size % PAD_MULTIPLE  # the tiny tower exercises the padded path
    module = Qwen2_5_VLMLP(config, bias=True)
    for p in module.parameters():
        torch.nn.init.normal_(p)
    module.__class__ = InfiniteVLVisionMLP
    module.config_act = act
    return module


@pytest.mark.parametrize("act", [None, "silu"], ids=["act_fn", "silu_glu"])
def test_padded_inference_equals_the_plain_mlp(act):
    module = mlp(act=act)
    x = torch.randn(7, module.hidden_size)
    expected = Qwen2_5_VLMLP.forward(module, x).detach()
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    with torch.no_grad():
        assert torch.equal(module(x), expected)  # on a CPU, the plain forward
        assert getattr(module, "_padded_layout", None) is None
        got = module.padded_forward(x)  # what CUDA inference runs
        again = module.padded_forward(x)  # the second call reuses the layout
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, got, rtol=0, atol=0)
    padded = module._padded_layout[0]
    assert padded.shape[0] == 2 * PAD_MULTIPLE * -(-module.intermediate_size // PAD_MULTIPLE)
    assert module.gate_proj.weight.untyped_storage().data_ptr() == padded.untyped_storage().data_ptr()  # a view, no copy
    for name, p in module.named_parameters():
        assert torch.equal(p, before[name]) and p.shape == before[name].shape, name


def mlp_laid_out_under_inference_mode():
    module = mlp()
    x = torch.randn(5, module.hidden_size)
    with torch.inference_mode():  # a first call under inference_mode must leave trainable parameters
        module.padded_forward(x)
    return module, x


def test_padded_parameters_save(tmp_path):
    module, _ = mlp_laid_out_under_inference_mode()
    state = module.state_dict()
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in state.values())
    save_file(state, tmp_path / "mlp.safetensors")
    loaded = load_file(tmp_path / "mlp.safetensors")
    for name, p in module.named_parameters():
        assert torch.equal(loaded[name], p), name


def test_padded_parameters_train():
    module, x = mlp_laid_out_under_inference_mode()
    loss = module(x).square().sum()  # gradients on: the parent's forward over the parameters
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_padded_parameters_move():
    module, x = mlp_laid_out_under_inference_mode()
    module.to(torch.float64)  # new parameter tensors: the padded layout is laid out again
    with torch.no_grad():
        got = module.padded_forward(x.double())
    torch.testing.assert_close(got, Qwen2_5_VLMLP.forward(module, x.double()).detach())
    assert module._padded_layout[0].dtype == torch.float64


def test_use_padded_vision_mlp_swaps_every_block():
    from helpers import tiny_model

    model = tiny_model()
    assert all(type(block.mlp) is InfiniteVLVisionMLP for block in model.model.visual.blocks)


def test_use_padded_vision_mlp_refuses_other_mlps():
    other = torch.nn.Module()
    other.blocks = torch.nn.ModuleList([torch.nn.Module()])
    other.blocks[0].mlp = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="Qwen2_5_VLMLP"):
        use_padded_vision_mlp(other)


def test_vision_norms_are_swapped():
    from helpers import tiny_model

    from infinitevl_hf.modeling.rms_norm import InfiniteVLRMSNorm

    norm = tiny_model().model.visual.blocks[0].norm1
    assert type(norm) is InfiniteVLRMSNorm


def test_vision_norms_equal_qwen2_rmsnorm():
    from helpers import tiny_model
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm

    norm = tiny_model().model.visual.blocks[0].norm1
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(5, norm.weight.shape[0], dtype=torch.bfloat16)
    torch.testing.assert_close(norm.to(torch.bfloat16)(x), Qwen2_5_VLRMSNorm.forward(norm, x), rtol=0, atol=0)
