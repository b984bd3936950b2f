"""The batched vision attention equals transformers' per-segment loop, and batches the segments."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_config, tiny_model
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLVisionAttention,
)

from infinitevl_hf.speed.vision.attention import InfiniteVLVisionAttention, use_batched_vision_attention

# The tiny tower: 2x2 patches, 2x2 merge, window 8 px -> windows of 2x2 merged units (16 patches);
# block 0 is windowed, block 1 full attention.
EQUAL = [[1, 8, 8]]  # 4 windows of 16; one image
EQUAL_FRAMES = [[2, 8, 8]]  # 8 windows of 16; 2 frames of 64
EDGE = [[1, 6, 10]]  # merged 3x5: windows of 16, 16, 8, 8, 8, 4
TWO_SIZES = [[1, 4, 4], [1, 6, 10]]  # images of 16 and 60 patches


def tower(implementation: str, seed: int = 0) -> Qwen2_5_VisionTransformerPretrainedModel:
    """An unswapped tiny tower; qkv weights scaled up so attention is far from uniform."""
    torch.manual_seed(seed)
    config = copy.deepcopy(tiny_config().vision_config)
    model = Qwen2_5_VisionTransformerPretrainedModel._from_config(config, attn_implementation=implementation).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(25)
    return model


def pixels(grid: list[list[int]], seed: int = 1) -> torch.Tensor:
    patches = sum(t * h * w for t, h, w in grid)
    return torch.randn(patches, 3 * 2 * 2 * 2, generator=torch.Generator().manual_seed(seed))


def attention_inputs(model, grid) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) each block's attention receives in a tower forward on `grid`."""
    seen: list[tuple[tuple, dict]] = []
    hooks = [
        block.attn.register_forward_pre_hook(lambda _, args, kwargs: seen.append((args, dict(kwargs))), with_kwargs=True)
        for block in model.blocks
    ]
    with torch.no_grad():
        model(pixels(grid), grid_thw=torch.tensor(grid))
    for hook in hooks:
        hook.remove()
    return seen


def segment_lengths(cu_seqlens: torch.Tensor) -> list[int]:
    return (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "grid, window_lengths, full_lengths",
    [
        (EQUAL, [16] * 4, [64]),
        (EQUAL_FRAMES, [16] * 8, [64, 64]),
        (EDGE, [16, 16, 8, 8, 8, 4], [60]),
        (TWO_SIZES, [16, 16, 16, 8, 8, 8, 4], [16, 60]),
    ],
)
def test_batched_attention_equals_the_per_segment_loop(implementation, grid, window_lengths, full_lengths):
    model = tower(implementation)
    inputs = attention_inputs(model, grid)
    assert [segment_lengths(kwargs["cu_seqlens"]) for _, kwargs in inputs] == [window_lengths, full_lengths]
    for block, (args, kwargs) in zip(model.blocks, inputs):
        with torch.no_grad():
            expected = Qwen2_5_VLVisionAttention.forward(block.attn, *args, **kwargs)
            batched = InfiniteVLVisionAttention.forward(block.attn, *args, **kwargs)
            # Attention over the whole sequence (no segments) must differ, or the comparison proves nothing.
            whole = Qwen2_5_VLVisionAttention.forward(
                block.attn, *args, **{**kwargs, "cu_seqlens": kwargs["cu_seqlens"][[0, -1]]}
            )
        assert batched.shape == expected.shape
        assert (batched - expected).abs().max().item() <= 1e-5
        if len(segment_lengths(kwargs["cu_seqlens"])) > 1:
            assert (whole - expected).abs().max().item() > 1e-2


@pytest.mark.parametrize(
    "grid, calls",
    [(EQUAL, [1, 1]), (EQUAL_FRAMES, [1, 1]), (EDGE, [3, 1]), (TWO_SIZES, [3, 2])],
)
def test_one_sdpa_call_per_distinct_segment_length(monkeypatch, grid, calls):
    model = tower("sdpa")
    use_batched_vision_attention(model)
    inputs = attention_inputs(model, grid)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    masks: list = []

    def counting_sdpa(*args, **kwargs):
        masks.append(kwargs.get("attn_mask"))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    counts = []
    for block, (args, kwargs) in zip(model.blocks, inputs):
        before = len(masks)
        with torch.no_grad():
            block.attn(*args, **kwargs)
        counts.append(len(masks) - before)
    assert counts == calls
    assert masks and all(mask is None for mask in masks)  # no mask: sdpa may pick its fused kernels


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("grid", [EQUAL, EQUAL_FRAMES, EDGE, TWO_SIZES])
def test_swapped_tower_equals_the_transformers_tower(implementation, grid):
    reference = tower(implementation)
    swapped = copy.deepcopy(reference)
    use_batched_vision_attention(swapped)
    assert all(type(block.attn) is InfiniteVLVisionAttention for block in swapped.blocks)
    assert all(type(block.attn) is Qwen2_5_VLVisionAttention for block in reference.blocks)
    assert list(swapped.state_dict()) == list(reference.state_dict())
    with torch.no_grad():
        expected = reference(pixels(grid), grid_thw=torch.tensor(grid))
        result = swapped(pixels(grid), grid_thw=torch.tensor(grid))
    for name in ("last_hidden_state", "pooler_output"):
        assert (result[name] - expected[name]).abs().max().item() <= 1e-5, name


def test_gradients_match_the_per_segment_loop():
    reference = tower("sdpa")
    swapped = copy.deepcopy(reference)
    use_batched_vision_attention(swapped)
    for model in (reference, swapped):
        model(pixels(TWO_SIZES), grid_thw=torch.tensor(TWO_SIZES)).pooler_output.square().sum().backward()
    for (name, expected), (_, result) in zip(reference.named_parameters(), swapped.named_parameters()):
        torch.testing.assert_close(result.grad, expected.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_model_uses_the_batched_attention_with_unchanged_keys():
    model = tiny_model()
    blocks = model.model.visual.blocks
    assert len(blocks) == 2 and all(type(block.attn) is InfiniteVLVisionAttention for block in blocks)
    keys = set(model.state_dict())
    assert {"model.visual.blocks.0.attn.qkv.weight", "model.visual.blocks.1.attn.proj.bias"} <= keys
    assert not any("InfiniteVLVisionAttention" in key for key in keys)
