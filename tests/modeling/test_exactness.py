"""The exactness spine: one-shot == stepwise, cache == no cache, chunked == one-shot, padded == alone."""

import pytest
import torch

from helpers import image_inputs, text_ids, tiny_model
from infinitevl_hf import InfiniteVLCache
from infinitevl_hf.modeling.compat import CACHE_KWARG


def _close(a, b, tol=1e-5):
    err = (a - b).norm() / b.norm()
    assert err < tol, f"relative error {err:.2e}"


def _stepwise_logits(model, input_ids, first=1, **vision):
    """Feed `first` tokens (with any vision inputs), then the rest one token at a time through one cache."""
    cache = InfiniteVLCache(model.config)
    logits = [model(input_ids=input_ids[:, :first], use_cache=True, **{CACHE_KWARG: cache}, **vision).logits]
    for t in range(first, input_ids.shape[1]):
        logits.append(model(input_ids=input_ids[:, t : t + 1], use_cache=True, **{CACHE_KWARG: cache}).logits)
    return torch.cat(logits, dim=1), cache


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_text_one_shot_equals_token_by_token(implementation):
    model = tiny_model(attn_implementation=implementation)
    ids = text_ids(2, 30)  # window 8: almost four windows
    with torch.no_grad():
        full = model(input_ids=ids).logits
        steps, cache = _stepwise_logits(model, ids)
    _close(steps, full)
    assert cache.get_seq_length() == 30


def test_image_prompt_one_shot_equals_token_by_token():
    model = tiny_model()
    ids, pixel_values, grid = image_inputs(grid=(1, 4, 8), prefix=3, suffix=20)  # 8 image tokens, 33 tokens
    vision = dict(pixel_values=pixel_values, image_grid_thw=grid)
    first = 3 + 1 + 8 + 1  # the image must arrive whole with its pixels
    with torch.no_grad():
        full = model(input_ids=ids, **vision).logits
        steps, _ = _stepwise_logits(model, ids, first=first, **vision)
    _close(steps, full)


def test_sdpa_equals_eager():
    ids = text_ids(2, 25)
    with torch.no_grad():
        a = tiny_model(attn_implementation="sdpa")(input_ids=ids).logits
        b = tiny_model(attn_implementation="eager")(input_ids=ids).logits
    _close(a, b)


@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_chunked_prefill_equals_one_shot(chunk):
    model = tiny_model()
    ids, pixel_values, grid = image_inputs(grid=(1, 4, 8), prefix=9, suffix=15)
    vision = dict(pixel_values=pixel_values, image_grid_thw=grid)
    with torch.no_grad():
        full = model(input_ids=ids, **vision).logits
        model.config.text_config.prefill_chunk_tokens = chunk
        model.model.language_model.config.prefill_chunk_tokens = chunk
        chunked = model(input_ids=ids, **vision).logits
    _close(chunked, full)


def test_prefill_then_decode_continues_positions_after_image():
    """A prompt with an image, then text through the cache == the whole sequence at once."""
    model = tiny_model()
    ids, pixel_values, grid = image_inputs(grid=(1, 8, 4), prefix=4, suffix=12)
    vision = dict(pixel_values=pixel_values, image_grid_thw=grid)
    split = 4 + 1 + 8 + 1 + 3
    with torch.no_grad():
        full = model(input_ids=ids, **vision).logits
        cache = InfiniteVLCache(model.config)
        head = model(input_ids=ids[:, :split], use_cache=True, **{CACHE_KWARG: cache}, **vision).logits
        tail = model(input_ids=ids[:, split:], use_cache=True, **{CACHE_KWARG: cache}).logits
    _close(torch.cat([head, tail], dim=1), full)


def test_left_padded_batch_rows_equal_solo_runs():
    model = tiny_model()
    long, short = text_ids(1, 21, seed=3), text_ids(1, 13, seed=4)
    pad = long.shape[1] - short.shape[1]
    batch = torch.cat([long, torch.cat([torch.full((1, pad), 7), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    with torch.no_grad():
        padded = model(input_ids=batch, attention_mask=mask).logits
        alone_long = model(input_ids=long).logits
        alone_short = model(input_ids=short).logits
        # and generation from the padded batch equals generation alone
        gen = model.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False)
        gen_short = model.generate(short, max_new_tokens=12, do_sample=False)
    _close(padded[0], alone_long[0])
    _close(padded[1, pad:], alone_short[0])
    assert torch.equal(gen[1, pad:], gen_short[0])


def test_padding_never_changes_gdn_state():
    model = tiny_model()
    short = text_ids(1, 10, seed=5)
    batch = torch.cat([torch.full((1, 6), 7), short], dim=1)  # a pad id with a real embedding
    mask = torch.cat([torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], dim=1)
    with torch.no_grad():
        padded_cache, alone_cache = InfiniteVLCache(model.config), InfiniteVLCache(model.config)
        model(input_ids=batch, attention_mask=mask, use_cache=True, **{CACHE_KWARG: padded_cache})
        model(input_ids=short, use_cache=True, **{CACHE_KWARG: alone_cache})
    for layer_padded, layer_alone, kind in zip(padded_cache.layers, alone_cache.layers, padded_cache.layer_types):
        if kind == "linear_attention":
            _close(layer_padded.recurrent_states[0], layer_alone.recurrent_states[0])
            for i in range(3):
                _close(layer_padded.conv_states[i], layer_alone.conv_states[i])
    assert torch.equal(padded_cache.next_positions, alone_cache.next_positions)


def test_generate_with_cache_equals_without():
    model = tiny_model()
    ids = text_ids(2, 11)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=20, do_sample=False, use_cache=True)
        uncached = model.generate(ids, max_new_tokens=20, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_generate_with_image_cache_equals_without():
    model = tiny_model()
    ids, pixel_values, grid = image_inputs()
    vision = dict(pixel_values=pixel_values, image_grid_thw=grid)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=16, do_sample=False, **vision)
        uncached = model.generate(ids, max_new_tokens=16, do_sample=False, use_cache=False, **vision)
    assert torch.equal(cached, uncached)


def test_chunked_prefill_keeps_only_the_requested_positions():
    """With logits_to_keep, a chunked prompt keeps just those positions (flat memory) and they are exact."""
    model = tiny_model()
    ids = text_ids(1, 40)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        model.config.text_config.prefill_chunk_tokens = 6
        model.model.language_model.config.prefill_chunk_tokens = 6
        last = model(input_ids=ids, logits_to_keep=1).logits
        hidden = model.model.language_model(input_ids=ids, keep_last=3).last_hidden_state
    assert last.shape[1] == 1 and hidden.shape[1] == 3
    _close(last[:, -1], full[:, -1])
