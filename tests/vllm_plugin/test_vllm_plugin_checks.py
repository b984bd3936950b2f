"""The vLLM plugin's config checks and its missing-vLLM error (no vLLM needed: this suite's environment has none)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from helpers import tiny_config
from infinitevl_hf.vllm_plugin.checks import check_servable, gdn_value_split

SERVABLE = dict(
    hidden_size=64,
    num_attention_heads=2,
    num_key_value_heads=1,
    rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1e6},
    linear_head_dim=64,
)


def _config(**overrides):
    return tiny_config(**{**SERVABLE, **overrides})


def test_servable_config_passes():
    config = _config()
    assert check_servable(config, torch.bfloat16, on_cpu=True) is None  # refusals raise (the tests below)


def test_servable_config_splits_value_heads():
    config = _config()
    assert gdn_value_split(config.text_config) == 2  # d_v 128 served as two 64-wide heads


@pytest.mark.parametrize(
    "overrides, dtype, message",
    [
        (dict(), torch.float32, "bfloat16 only"),
        (dict(linear_head_dim=32), torch.bfloat16, "`linear_head_dim` is 32"),
        (dict(num_attention_heads=4, num_key_value_heads=2, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]}), torch.bfloat16, "head size"),
        (dict(conv_bias=True), torch.bfloat16, "conv_bias=True"),
        (dict(expand_v=1.5), torch.bfloat16, "multiple of the key head dim"),
    ],
    ids=["dtype", "gdn-head-dim", "attention-head-size", "conv-bias", "value-dim"],
)
def test_unservable_config_is_named(overrides, dtype, message):
    with pytest.raises(ValueError) as info:
        check_servable(_config(**overrides), dtype, on_cpu=True)
    assert message in str(info.value)


def test_gpu_accepts_what_only_the_cpu_kernels_refuse():
    check_servable(_config(linear_head_dim=32), torch.float16, on_cpu=False)


def test_not_infinitevl_is_named():
    from transformers import Qwen2_5_VLConfig

    with pytest.raises(ValueError, match="Not an InfiniteVL checkpoint"):
        check_servable(Qwen2_5_VLConfig(), torch.bfloat16, on_cpu=True)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_missing_vllm_says_how_to_install():
    from infinitevl_hf.vllm_plugin import register

    with pytest.raises(ImportError, match=r'pip install "infinitevl-hf\[vllm\]"'):
        register()
    with pytest.raises(ImportError, match="needs vLLM"):
        importlib.import_module("infinitevl_hf.vllm_plugin.model")
