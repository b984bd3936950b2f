"""Wrong inputs and configs are refused with an error that names the problem, before anything runs."""

from __future__ import annotations

import pytest
import torch
from helpers import IMAGE_TOKEN, image_inputs, text_ids, tiny_config, tiny_model

from infinitevl_hf import InfiniteVLCache, InfiniteVLConfig, InfiniteVLTextConfig, InfiniteVLVisionConfig
from infinitevl_hf.modeling.compat import CACHE_KWARG


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_image_placeholders_without_pixels(model):
    ids, _, _ = image_inputs()
    with pytest.raises(ValueError, match=r"4 image placeholder tokens \(id 90\) but no `pixel_values`"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="no `pixel_values`"):
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)


def test_a_generated_placeholder_token_is_not_an_error(model):
    cache = InfiniteVLCache(model.config)
    with torch.no_grad():
        model(input_ids=text_ids(1, 6), use_cache=True, **{CACHE_KWARG: cache})
        model(input_ids=torch.tensor([[IMAGE_TOKEN]]), use_cache=True, **{CACHE_KWARG: cache})
    assert cache.seen_tokens == 7


@pytest.mark.parametrize("rows", [-4, 4])
def test_grid_that_does_not_cover_the_pixel_rows(model, rows):
    ids, pixels, grid = image_inputs()
    pixels = pixels[:rows] if rows < 0 else torch.cat([pixels, pixels[:rows]])
    with pytest.raises(ValueError, match=r"grids \[\[1, 4, 4\]\] cover 16 patch rows, but the image pixel values have shape"):
        model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid)


def test_grid_of_bad_shape_or_values(model):
    ids, pixels, _ = image_inputs()
    with pytest.raises(ValueError, match="image_grid_thw` must be"):
        model(input_ids=ids, pixel_values=pixels, image_grid_thw=torch.tensor([[1, 0, 16]]))
    with pytest.raises(ValueError, match="multiples of the merge size"):
        model(input_ids=ids, pixel_values=pixels, image_grid_thw=torch.tensor([[1, 1, 16]]))


def test_empty_input_ids(model):
    empty = torch.zeros(1, 0, dtype=torch.long)
    with pytest.raises(ValueError, match="input is empty"):
        model(input_ids=empty)
    with pytest.raises(ValueError, match="input is empty"):
        model.generate(input_ids=empty, attention_mask=torch.ones_like(empty), max_new_tokens=2)


@pytest.mark.parametrize("other", [dict(sliding_window=16), dict(layer_types=["sliding_attention"] * 2 + ["linear_attention"] * 3)])
def test_a_cache_built_for_another_config(model, other):
    cache = InfiniteVLCache(tiny_config(**other))
    with pytest.raises(ValueError, match="built for another model config"):
        model(input_ids=text_ids(1, 5), use_cache=True, **{CACHE_KWARG: cache})
    with pytest.raises(ValueError, match="built for another model config"):
        model.generate(input_ids=text_ids(1, 5), max_new_tokens=2, do_sample=False, **{CACHE_KWARG: InfiniteVLCache(tiny_config(**other))})
    assert cache.seen_tokens == 0


@pytest.mark.parametrize("name", ["past_key_values", "cache"])
def test_a_cache_of_another_kind_is_named_in_generate_and_forward(model, name):
    from transformers import DynamicCache

    for wrong in ("nope", DynamicCache()):
        with pytest.raises(TypeError, match=f"needs an `InfiniteVLCache`.*got {type(wrong).__name__}"):
            model.generate(input_ids=text_ids(1, 5), max_new_tokens=2, do_sample=False, **{name: wrong})
        with pytest.raises(TypeError, match="needs an `InfiniteVLCache`"):
            model(input_ids=text_ids(1, 5), use_cache=True, **{CACHE_KWARG: wrong})


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: InfiniteVLVisionConfig(hidden_size=30, num_heads=4), "vision `hidden_size` .30. must be divisible by vision `num_heads`"),
        (lambda: InfiniteVLConfig(vision_config=dict(hidden_size=30, num_heads=4)), "vision `hidden_size`"),
        (lambda: InfiniteVLTextConfig(rms_norm_eps=-1e-6), "rms_norm_eps"),
        (lambda: InfiniteVLTextConfig(rms_norm_eps=0.0), "rms_norm_eps"),
        (lambda: InfiniteVLTextConfig(norm_eps=float("nan")), "norm_eps"),
        (lambda: InfiniteVLTextConfig(use_sliding_window=False), "use_sliding_window"),
    ],
)
def test_bad_config_values_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def generate_with_unbounded_attention_spelled_per_layer():
    model = tiny_model(layer_types=["full_attention", "linear_attention", "linear_attention", "full_attention", "linear_attention"],
                       use_sliding_window=False)
    ids = text_ids(1, 6)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        plain = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, use_cache=False)
    return cached, plain


def test_unbounded_attention_spelled_per_layer_generates_every_new_token():
    cached, _ = generate_with_unbounded_attention_spelled_per_layer()
    assert cached.shape == (1, 10)


def test_unbounded_attention_spelled_per_layer_generates_with_the_cache_as_without():
    cached, plain = generate_with_unbounded_attention_spelled_per_layer()
    assert torch.equal(cached, plain)
