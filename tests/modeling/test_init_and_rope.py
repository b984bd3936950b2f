"""Weight initialisation, explicit state dicts, tied weights across shards, and the rope types the mRoPE builds."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import text_ids, tiny_config, tiny_model
from infinitevl_hf import InfiniteVLCache, InfiniteVLForConditionalGeneration
from infinitevl_hf.modeling.compat import CACHE_KWARG
from infinitevl_hf.modeling.attention import InfiniteVLRotaryEmbedding

MROPE = {"mrope_section": [1, 1, 2], "rope_theta": 10000.0}


def _initialised_over_nan():
    """A model built on meta, filled with NaN on CPU, then given init_weights()."""
    with torch.device("meta"):
        model = InfiniteVLForConditionalGeneration(tiny_config())
    model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))
    model.init_weights()
    return model


def test_init_weights_writes_every_parameter_buffer_included():
    model = _initialised_over_nan()
    untouched = [name for name, t in [*model.named_parameters(), *model.named_buffers()]
                 if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    assert untouched == []


def test_init_weights_computes_the_buffers_of_a_fresh_model():
    model = _initialised_over_nan()
    fresh = dict(InfiniteVLForConditionalGeneration(tiny_config()).named_buffers())
    for name, buffer in model.named_buffers():  # buffers are computed, not random: they equal a fresh model's
        torch.testing.assert_close(buffer, fresh[name], rtol=0, atol=0)


def test_from_pretrained_without_a_checkpoint_loads_the_given_state_dict():
    source = tiny_model()
    model = InfiniteVLForConditionalGeneration.from_pretrained(None, config=source.config, state_dict=source.state_dict())
    ids = text_ids(1, 6)
    torch.testing.assert_close(model(ids).logits, source(ids).logits, rtol=0, atol=0)


def test_from_pretrained_without_a_checkpoint_initialises_what_the_state_dict_lacks():
    source = tiny_model()
    given = {k: v for k, v in source.state_dict().items() if ".A_log" not in k}
    model = InfiniteVLForConditionalGeneration.from_pretrained(None, config=source.config, state_dict=given)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in given.items())
    for i in (1, 2, 3):
        decay = model.model.language_model.layers[i].self_attn.A_log.exp()
        assert bool(((decay > 0) & (decay < 16)).all())  # the official A ~ U(0, 16)
    empty = InfiniteVLForConditionalGeneration.from_pretrained(None, config=source.config, state_dict={})
    assert all(bool(torch.isfinite(p).all()) for p in empty.parameters())


def test_from_pretrained_without_a_checkpoint_still_refuses_unexpected_tensors():
    source = tiny_model()
    extra = {**source.state_dict(), "model.language_model.layers.1.self_attn.extra": torch.zeros(2)}
    with pytest.raises(ValueError, match="unexpected tensors"):
        InfiniteVLForConditionalGeneration.from_pretrained(None, config=source.config, state_dict=extra)


def _tied_in_shards(tmp_path):
    """A tied model saved in 20 KB shards, and the shards' weight map."""
    source = tiny_model()
    source.save_pretrained(tmp_path, max_shard_size="20KB")
    return source, json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]


def test_tied_head_is_saved_once_as_the_embeddings(tmp_path):
    _, weight_map = _tied_in_shards(tmp_path)
    assert "lm_head.weight" not in weight_map and "model.language_model.embed_tokens.weight" in weight_map


def test_tied_checkpoint_is_written_in_several_shards(tmp_path):
    _, weight_map = _tied_in_shards(tmp_path)
    assert len(set(weight_map.values())) > 1


def test_tied_head_loads_from_shards_as_the_embeddings_tensor(tmp_path):
    _tied_in_shards(tmp_path)
    model = InfiniteVLForConditionalGeneration.from_pretrained(tmp_path)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight


def test_tied_checkpoint_loaded_from_shards_gives_the_same_logits(tmp_path):
    source, _ = _tied_in_shards(tmp_path)
    model = InfiniteVLForConditionalGeneration.from_pretrained(tmp_path)
    ids = text_ids(1, 6)
    torch.testing.assert_close(model(ids).logits, source(ids).logits, rtol=0, atol=0)


def _rotary(**rope):
    return InfiniteVLRotaryEmbedding(tiny_config(rope_parameters={**MROPE, **rope}).text_config)


def test_linear_rope_scales_positions_down_by_its_factor():
    default, linear = _rotary(rope_type="default"), _rotary(rope_type="linear", factor=2.0)
    positions = torch.arange(0, 40, 2)[None, None].expand(3, 1, -1)
    x = torch.zeros(1)
    for got, expected in zip(linear(x, positions), default(x, positions // 2)):
        torch.testing.assert_close(got, expected)


def _yarn():
    return _rotary(rope_type="yarn", factor=4.0, original_max_position_embeddings=1024)


def test_yarn_rope_builds_its_attention_factor():
    assert _yarn().attention_scaling == pytest.approx(0.1 * math.log(4.0) + 1)


def test_yarn_rope_keeps_the_fastest_frequency():
    default, yarn = _rotary(rope_type="default"), _yarn()
    assert torch.equal(yarn.inv_freq[:1], default.inv_freq[:1])  # the fastest frequency is kept


def test_yarn_rope_interpolates_the_slowest_frequency():
    default, yarn = _rotary(rope_type="default"), _yarn()
    assert bool((yarn.inv_freq[-1] < default.inv_freq[-1]))  # the slowest is interpolated


def test_yarn_rope_scales_cos_by_its_attention_factor():
    yarn = _yarn()
    cos, _ = yarn(torch.zeros(1), torch.zeros(3, 1, 1, dtype=torch.long))
    torch.testing.assert_close(cos, torch.full_like(cos, yarn.attention_scaling))


@pytest.mark.parametrize("rope_type", ["linear", "yarn"])
def test_scaled_rope_models_decode_token_by_token_as_one_shot(rope_type):
    model = tiny_model(rope_parameters={**MROPE, "rope_type": rope_type, "factor": 2.0,
                                        "original_max_position_embeddings": 1024})
    ids = text_ids(1, 12)
    whole = model(ids).logits
    cache = InfiniteVLCache(model.config)
    steps = [model(ids[:, :4], use_cache=True, **{CACHE_KWARG: cache}).logits]
    for t in range(4, 12):
        steps.append(model(ids[:, t:t + 1], use_cache=True, **{CACHE_KWARG: cache}).logits)
    torch.testing.assert_close(torch.cat(steps, 1), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope", "llama3"])
def test_config_refuses_rope_types_the_mrope_does_not_build(rope_type):
    with pytest.raises(ValueError, match=rf"rope_type.*{rope_type}"):
        tiny_config(rope_parameters={**MROPE, "rope_type": rope_type, "factor": 2.0})
