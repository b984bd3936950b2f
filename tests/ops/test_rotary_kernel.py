"""The vision tower's rotary kernel (`ops.rotary`) against transformers' `apply_rotary_pos_emb_vision`: under
Triton's CPU interpreter everywhere, compiled on a GPU; and the dispatcher's torch path off CUDA."""

from pathlib import Path

import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

from helpers import run_under_triton_interpreter
from infinitevl_hf.modeling.ops.rotary import split_qkv, vision_rotary_qk


def test_kernel_matches_transformers_under_the_triton_interpreter():
    output = run_under_triton_interpreter(Path(__file__).with_name("interpreted_rotary_kernel.py"))
    assert output.count("ok  ") == 6, output


def test_off_cuda_the_dispatcher_is_transformers_function():
    qkv = torch.randn(7, 3 * 2 * 8)
    angles = torch.randn(7, 8)
    got = vision_rotary_qk(qkv, 2, angles.cos(), angles.sin())
    query, key, _ = split_qkv(qkv, 2)
    for g, e in zip(got, apply_rotary_pos_emb_vision(query, key, angles.cos(), angles.sin())):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernel_matches_transformers_on_the_gpu():
    from infinitevl_hf.modeling.ops.rotary import triton_vision_rotary_qk

    assert triton_vision_rotary_qk is not None
    torch.manual_seed(0)
    tokens, heads, dim = 16 * 1024 + 3, 16, 80  # the 4B tower's heads; a partial last block
    qkv = torch.randn(tokens, 3 * heads * dim, device="cuda", dtype=torch.bfloat16)
    freqs = torch.randn(tokens, dim // 2, device="cuda") * 20
    angles = torch.cat([freqs, freqs], dim=-1)
    query, key, _ = split_qkv(qkv, heads)
    expected = apply_rotary_pos_emb_vision(query, key, angles.cos(), angles.sin())
    with torch.no_grad():
        got = vision_rotary_qk(qkv, heads, angles.cos(), angles.sin())
    for g, e in zip(got, expected):
        assert g.is_contiguous()
        torch.testing.assert_close(g, e)  # bf16 tolerance: both round a float32 result once
