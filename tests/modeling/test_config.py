"""InfiniteVLConfig reads the released config as is, builds the period-4 layout, and names bad fields."""

import json
from pathlib import Path

import pytest

from infinitevl_hf import InfiniteVLConfig, InfiniteVLTextConfig

OFFICIAL = Path(__file__).resolve().parents[2] / "tests" / "data" / "official_config.json"


def official() -> InfiniteVLConfig:
    return InfiniteVLConfig(**json.loads(OFFICIAL.read_text()))


def test_official_config_reads_as_released():
    config = official()
    text = config.text_config
    assert text.layer_types == ["sliding_attention" if i % 4 == 0 else "linear_attention" for i in range(36)]
    assert text.layer_types.count("sliding_attention") == 9
    assert (text.hidden_size, text.intermediate_size, text.vocab_size, text.num_hidden_layers) == (2048, 11008, 151936, 36)
    assert (text.num_attention_heads, text.num_key_value_heads, text.sliding_window) == (16, 2, 8192)
    assert text.rope_parameters["mrope_section"] == [16, 24, 24] and text.rope_parameters["rope_theta"] == 1e6
    assert (text.num_linear_heads, text.linear_head_dim, text.linear_value_head_dim, text.conv_size) == (16, 128, 256, 4)
    assert text.use_gate and text.use_short_conv and text.mode == "chunk" and text.norm_eps == 1e-5
    assert config.tie_word_embeddings and text.rms_norm_eps == 1e-6
    vision = config.vision_config
    assert (vision.depth, vision.hidden_size, vision.out_hidden_size, list(vision.fullatt_block_indexes)) == (
        32, 1280, 2048, [7, 15, 23, 31])
    assert config.image_token_id == 151655 and config.video_token_id == 151656
    # the stored flash-attention request does not force an unavailable backend
    assert config._attn_implementation in (None, "sdpa")


def test_config_rebuilt_from_its_nested_dict_equals_the_flat_one():
    flat = official()
    nested = InfiniteVLConfig(**flat.to_dict())
    assert nested.text_config.to_dict() == flat.text_config.to_dict()
    assert nested.vision_config.to_dict() == flat.vision_config.to_dict()


def test_default_config_is_the_released_layout():
    assert InfiniteVLTextConfig().layer_types[:5] == [
        "sliding_attention", "linear_attention", "linear_attention", "linear_attention", "sliding_attention"]


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_hidden_layers=4, layer_types=["linear_attention"] * 3), "layer_types"),
        (dict(num_hidden_layers=2, layer_types=["linear_attention", "recurrent"]), r"layer_types\[1\]"),
        (dict(hidden_size=30, num_attention_heads=4), "num_attention_heads"),
        (dict(num_attention_heads=16, num_key_value_heads=3), "num_key_value_heads"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(sliding_window=-5), "sliding_window"),
        (dict(expand_v=1.5, linear_head_dim=5), "expand_v"),
        (dict(num_linear_heads=8, num_linear_key_value_heads=4), "num_linear_heads"),
        (dict(mode="parallel"), "mode"),
        (dict(conv_size=0), "conv_size"),
        (dict(prefill_chunk_tokens=0), "prefill_chunk_tokens"),
    ],
)
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        InfiniteVLTextConfig(**overrides)


def test_documented_defaults_match_the_fields():
    """Every `name (`type`, defaults to X)` line of the text config docstring states the real default."""
    import ast
    import re

    doc = InfiniteVLTextConfig.__doc__
    documented = dict(re.findall(r"^\s*(\w+) \(`[^`]+`(?: or None)?, defaults to ([^)]+)\)", doc, flags=re.M))
    assert len(documented) >= 10, documented
    fields = InfiniteVLTextConfig.__dataclass_fields__
    for name, text in documented.items():
        assert name in fields, f"{name} is documented but is not a field"
        default = fields[name].default
        assert ast.literal_eval(text.strip()) == default, f"{name}: documented {text}, actual {default!r}"
