"""Bad input to the plugin ends in one clear error each: not an InfiniteVL checkpoint, an unsupported dtype,
an unsupported head size."""

from __future__ import annotations

import json

import pytest

from vllm_helpers import ENGINE_ARGS, write_checkpoint


def _engine(path, **overrides):
    from vllm import LLM

    return LLM(model=str(path), **{**ENGINE_ARGS, **overrides})


def _message(error: BaseException) -> str:
    """The error and its causes (vLLM may wrap the model's error)."""
    parts = []
    while error is not None:
        parts.append(str(error))
        error = error.__cause__ or error.__context__
    return " | ".join(parts)


def test_checkpoint_that_is_not_infinitevl_is_refused(tmp_path):
    path = write_checkpoint(tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="qwen2_5_vl")  # still claims the InfiniteVL architecture
    config["text_config"]["model_type"] = "qwen2_5_vl_text"
    config["vision_config"]["model_type"] = "qwen2_5_vl"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception) as info:
        _engine(path)
    assert "Not an InfiniteVL checkpoint" in _message(info.value)


def test_unsupported_dtype_is_refused(tmp_path):
    path = write_checkpoint(tmp_path / "ckpt")
    with pytest.raises(Exception) as info:
        _engine(path, dtype="float32")
    assert "bfloat16 only" in _message(info.value)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(linear_head_dim=32), "`linear_head_dim` is 32"),
        (dict(num_attention_heads=4, num_key_value_heads=2, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}), "head size"),
    ],
    ids=["gdn-head-dim", "attention-head-size"],
)
def test_unsupported_head_size_is_refused(tmp_path, overrides, field):
    path = write_checkpoint(tmp_path / "ckpt", **overrides)
    with pytest.raises(Exception) as info:
        _engine(path)
    assert field in _message(info.value)
