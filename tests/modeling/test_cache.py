"""InfiniteVLCache: constant size, generate() integration, beam/sampling, fork, refusals."""

import copy

import pytest
import torch

from helpers import text_ids, tiny_model
from infinitevl_hf import InfiniteVLCache
from infinitevl_hf.modeling.cache import InfiniteVLRingAttentionLayer
from infinitevl_hf.modeling.compat import CACHE_KWARG


def _fill(model, tokens: int) -> InfiniteVLCache:
    cache = InfiniteVLCache(model.config)
    with torch.no_grad():
        model(input_ids=text_ids(1, tokens), use_cache=True, **{CACHE_KWARG: cache})
    return cache


def test_cache_bytes_are_constant_after_the_window_fills():
    model = tiny_model()
    window = model.config.text_config.sliding_window
    two, twenty = _fill(model, 2 * window), _fill(model, 20 * window)
    assert two.nbytes == twenty.nbytes > 0
    # attention layers keep exactly window - 1 keys; GDN layers their fixed states
    for layer, kind in zip(twenty.layers, twenty.layer_types):
        if kind == "sliding_attention":
            assert layer.keys.shape[-2] == window - 1
        else:
            assert layer.recurrent_states[0].dtype == torch.float32
            assert layer.conv_states[0].shape[-1] == model.config.text_config.conv_size - 1


def test_cache_bytes_are_constant_while_decoding():
    model = tiny_model()
    cache = _fill(model, 3 * model.config.text_config.sliding_window)
    sizes = []
    with torch.no_grad():
        for t in range(12):
            model(input_ids=text_ids(1, 1, seed=t), use_cache=True, **{CACHE_KWARG: cache})
            sizes.append(cache.nbytes)
    assert len(set(sizes)) == 1


def test_generate_creates_an_infinitevl_cache():
    model = tiny_model()
    out = model.generate(text_ids(1, 6), max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = out[CACHE_KWARG] if CACHE_KWARG in out else out.past_key_values
    assert isinstance(cache, InfiniteVLCache)
    assert cache.get_seq_length() == 6 + 4 - 1


def test_beam_search_matches_its_uncached_run():
    model = tiny_model()
    ids = text_ids(2, 7)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False)
        uncached = model.generate(ids, max_new_tokens=8, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_sampling_with_several_return_sequences_gives_every_row():
    model = tiny_model()
    torch.manual_seed(0)
    out = model.generate(text_ids(2, 5), max_new_tokens=6, do_sample=True, top_k=20, num_return_sequences=3)
    assert out.shape == (6, 11)


def test_fork_is_independent():
    model = tiny_model()
    cache = _fill(model, 20)
    snapshot = copy.deepcopy(cache)
    fork = cache.fork()
    with torch.no_grad():
        model(input_ids=text_ids(1, 5), use_cache=True, **{CACHE_KWARG: fork})
    for a, b in zip(cache.layers, snapshot.layers):
        if hasattr(a, "keys") and a.keys is not None:
            assert torch.equal(a.keys, b.keys)
        else:
            assert torch.equal(a.recurrent_states[0], b.recurrent_states[0])
    assert fork.get_seq_length() == 25 and cache.get_seq_length() == 20


def test_fork_then_continue_equals_continuing_the_original():
    model = tiny_model()
    cache = _fill(model, 13)
    fork = cache.fork()
    nxt = text_ids(1, 3, seed=9)
    with torch.no_grad():
        a = model(input_ids=nxt, use_cache=True, **{CACHE_KWARG: cache}).logits
        b = model(input_ids=nxt, use_cache=True, **{CACHE_KWARG: fork}).logits
    assert torch.equal(a, b)


def _static(model, tokens: int) -> InfiniteVLCache:
    cache = _fill(model, tokens)
    cache.to_static()
    return cache


def test_a_static_fork_holds_its_own_tensors_with_the_same_values():
    model = tiny_model()
    cache = _static(model, 13)
    fork = cache.fork()
    assert len(cache._state_tensors()) == len(fork._state_tensors())
    for a, b in zip(cache._state_tensors(), fork._state_tensors()):
        assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
        assert torch.equal(a, b)


def test_a_static_fork_keeps_one_shared_step_counter():
    """The ring layers and the cache read one step tensor; the copy (one batched copy of the state) keeps it one."""
    fork = _static(tiny_model(), 13).fork()
    rings = [layer for layer in fork.layers if isinstance(layer, InfiniteVLRingAttentionLayer)]
    assert rings and all(layer.step is fork.device_step for layer in rings)


def test_own_buffers_leaves_the_cache_it_shared_with_untouched():
    model = tiny_model()
    holder, cache = _static(model, 13), _static(model, 13)
    cache.share_buffers_of(holder)  # the two are one memory now (as a cache and the graphs' buffers)
    cache.own_buffers()
    before = [t.clone() for t in holder._state_tensors()]
    assert all(a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
               for a, b in zip(cache._state_tensors(), holder._state_tensors()))
    with torch.no_grad():
        model(input_ids=text_ids(1, 1, seed=9), use_cache=True, **{CACHE_KWARG: cache})
    assert all(torch.equal(a, b) for a, b in zip(before, holder._state_tensors()))


def test_own_buffers_then_continue_equals_continuing_the_original():
    model = tiny_model()
    cache, other = _static(model, 13), _static(model, 13)
    other.own_buffers()
    nxt = text_ids(1, 1, seed=9)
    with torch.no_grad():
        a = model(input_ids=nxt, use_cache=True, **{CACHE_KWARG: cache}).logits
        b = model(input_ids=nxt, use_cache=True, **{CACHE_KWARG: other}).logits
    assert torch.equal(a, b)


def test_a_fork_of_a_cache_holding_tensors_that_require_grad_is_a_plain_deepcopy():
    """Such a fork keeps leaves as leaves (a batched copy under autograd would record a graph instead)."""
    cache = _static(tiny_model(), 13)
    ring = next(layer for layer in cache.layers if isinstance(layer, InfiniteVLRingAttentionLayer))
    ring.keys = ring.keys.detach().requires_grad_()
    forked = next(layer for layer in cache.fork().layers if isinstance(layer, InfiniteVLRingAttentionLayer))
    assert forked.keys.requires_grad and forked.keys.is_leaf


def test_a_fork_of_a_cache_holding_views_keeps_them_views():
    """Where state tensors share storage, the fork falls back to a plain deepcopy, which keeps views as views."""
    cache = _static(tiny_model(), 13)
    ring = next(layer for layer in cache.layers if isinstance(layer, InfiniteVLRingAttentionLayer))
    both = torch.cat([ring.keys, ring.values])  # keys and values as two halves of one buffer
    ring.keys, ring.values = both[: ring.keys.shape[0]], both[ring.keys.shape[0]:]
    fork = cache.fork()
    forked = next(layer for layer in fork.layers if isinstance(layer, InfiniteVLRingAttentionLayer))
    assert forked.keys.untyped_storage().data_ptr() == forked.values.untyped_storage().data_ptr()
    assert forked.keys.untyped_storage().data_ptr() != ring.keys.untyped_storage().data_ptr()


def test_reset_empties_the_cache():
    model = tiny_model()
    cache = _fill(model, 10)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.next_positions is None
    fresh = InfiniteVLCache(model.config)
    ids = text_ids(1, 4)
    with torch.no_grad():
        a = model(input_ids=ids, use_cache=True, **{CACHE_KWARG: cache}).logits
        b = model(input_ids=ids, use_cache=True, **{CACHE_KWARG: fresh}).logits
    assert torch.equal(a, b)


def _batch_and_solo(model):
    """A cache over two rows and one over the second row alone."""
    cache = InfiniteVLCache(model.config)
    ids = text_ids(2, 12)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{CACHE_KWARG: cache})
        solo = InfiniteVLCache(model.config)
        model(input_ids=ids[1:], use_cache=True, **{CACHE_KWARG: solo})
    return cache, solo


def test_batch_select_keeps_the_selected_row_consistent():
    model = tiny_model()
    cache, solo = _batch_and_solo(model)
    cache.batch_select_indices(torch.tensor([1]))
    nxt = text_ids(1, 2, seed=11)
    with torch.no_grad():
        a = model(input_ids=nxt, use_cache=True, **{CACHE_KWARG: cache}).logits
        b = model(input_ids=nxt, use_cache=True, **{CACHE_KWARG: solo}).logits
    torch.testing.assert_close(a, b)


def test_batch_repeat_interleave_repeats_every_row_state():
    model = tiny_model()
    _, solo = _batch_and_solo(model)
    solo.batch_repeat_interleave(3)
    assert solo.next_positions.shape == (3,)
    assert all(layer.recurrent_states[0].shape[0] == 3 for layer, k in zip(solo.layers, solo.layer_types) if k == "linear_attention")


def test_rollback_is_refused_with_a_clear_error():
    model = tiny_model()
    cache = _fill(model, 10)
    with pytest.raises(ValueError, match="cannot remove tokens"):
        cache.crop(-2)


def test_a_foreign_cache_is_refused():
    from transformers import DynamicCache

    model = tiny_model()
    with pytest.raises(TypeError, match="InfiniteVLCache"):
        model(input_ids=text_ids(1, 4), use_cache=True, **{CACHE_KWARG: DynamicCache()})


def test_static_ring_decode_equals_dynamic_decode():
    """After the prompt, a static cache (rings of `window` slots) decodes exactly like the dynamic one."""
    model = tiny_model()
    ids = text_ids(2, 19)
    dynamic, static = InfiniteVLCache(model.config), InfiniteVLCache(model.config)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{CACHE_KWARG: dynamic})
        model(input_ids=ids, use_cache=True, **{CACHE_KWARG: static})
        bytes_before = static.to_static().nbytes
        for t in range(3 * model.config.text_config.sliding_window):
            step = text_ids(2, 1, seed=100 + t)
            a = model(input_ids=step, use_cache=True, **{CACHE_KWARG: dynamic}).logits
            b = model(input_ids=step, use_cache=True, **{CACHE_KWARG: static}).logits
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert static.nbytes == bytes_before
    window = model.config.text_config.sliding_window
    longer = text_ids(2, window + 3, seed=77)  # more than a ring holds: the decoder splits it into windows
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=longer, use_cache=True, **{CACHE_KWARG: static}).logits,
            model(input_ids=longer, use_cache=True, **{CACHE_KWARG: dynamic}).logits,
            rtol=1e-5, atol=1e-6,
        )
    ring = next(layer for layer in static.layers if isinstance(layer, InfiniteVLRingAttentionLayer))
    with pytest.raises(ValueError, match=f"at most window={window} tokens"):
        ring.update(torch.zeros(2, 2, window + 1, 8), torch.zeros(2, 2, window + 1, 8))


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_static_ring_takes_chunks_like_the_dynamic_cache(implementation):
    """Chunks of up to `window` tokens (images too) through the rings equal the dynamic cache, padding included."""
    model = tiny_model(attn_implementation=implementation)
    window = model.config.text_config.sliding_window
    dynamic, static = InfiniteVLCache(model.config), InfiniteVLCache(model.config)
    prompt = text_ids(2, 5)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0  # a left-padded row
    with torch.no_grad():
        model(input_ids=prompt, attention_mask=mask, use_cache=True, **{CACHE_KWARG: dynamic})
        model(input_ids=prompt, attention_mask=mask, use_cache=True, **{CACHE_KWARG: static})
        static.to_static()
        seen = 5
        for t, size in enumerate([3, window, 1, 5, 2, window - 1, 4]):
            chunk = text_ids(2, size, seed=200 + t)
            mask = torch.cat([mask, torch.ones(2, size, dtype=torch.long)], dim=1)
            a = model(input_ids=chunk, attention_mask=mask, use_cache=True, **{CACHE_KWARG: dynamic}).logits
            b = model(input_ids=chunk, attention_mask=mask, use_cache=True, **{CACHE_KWARG: static}).logits
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
            seen += size
            if size > 1:  # the rings of one call share one chunk mask, built by the first of them
                rings = [layer for layer in static.layers if isinstance(layer, InfiniteVLRingAttentionLayer)]
                assert len(rings) > 1 and all(r.chunk_mask is rings[0].chunk_mask for r in rings)
    assert static.is_static and static.get_seq_length() == seen


def test_static_cache_turns_back_into_the_dynamic_one():
    model = tiny_model()
    dynamic, static = InfiniteVLCache(model.config), InfiniteVLCache(model.config)
    ids = text_ids(1, 19)
    with torch.no_grad():
        for cache in (dynamic, static):
            model(input_ids=ids, use_cache=True, **{CACHE_KWARG: cache})
        static.to_static()
        for t in range(4):
            step = text_ids(1, 1, seed=300 + t)
            for cache in (dynamic, static):
                model(input_ids=step, use_cache=True, **{CACHE_KWARG: cache})
    static.to_dynamic()
    assert not static.is_static
    for a, b in zip(dynamic.layers, static.layers):
        if hasattr(a, "keys") and a.keys is not None:
            torch.testing.assert_close(b.keys, a.keys)
            assert b.cumulative_length == a.cumulative_length
    nxt = text_ids(1, 6, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=nxt, use_cache=True, **{CACHE_KWARG: static}).logits,
            model(input_ids=nxt, use_cache=True, **{CACHE_KWARG: dynamic}).logits,
            rtol=1e-5, atol=1e-6,
        )


def test_generate_with_static_cache_equals_dynamic():
    model = tiny_model()
    ids = text_ids(2, 9)
    with torch.no_grad():
        dynamic = model.generate(ids, max_new_tokens=25, do_sample=False)
        out = model.generate(
            ids, max_new_tokens=25, do_sample=False, cache_implementation="static", return_dict_in_generate=True
        )
    cache = out[CACHE_KWARG] if CACHE_KWARG in out else out.past_key_values
    assert cache.is_static  # the decode steps ran on the rings
    assert torch.equal(dynamic, out.sequences)


def test_the_window_counts_as_full_after_window_minus_one_tokens_since_the_last_padding():
    model = tiny_model(sliding_window=16)
    cache = InfiniteVLCache(model.config)
    assert cache.full_windows == (False,)
    with torch.no_grad():
        model(input_ids=text_ids(2, 10), use_cache=True, **{CACHE_KWARG: cache})
        assert not cache.window_is_full(16) and cache.window_is_full(11)
        model(input_ids=text_ids(2, 5, seed=1), use_cache=True, **{CACHE_KWARG: cache})
        assert cache.window_is_full(16) and cache.full_windows == (True,)
        padded = torch.ones(2, 15 + 3, dtype=torch.long)
        padded[1, -1] = 0  # a padded token: its slot holds no token until it leaves the window
        model(input_ids=text_ids(2, 3, seed=2), attention_mask=padded, use_cache=True, **{CACHE_KWARG: cache})
        assert cache.padded_through == 18 and not cache.window_is_full(16)
        all_valid = torch.ones(2, 18 + 15, dtype=torch.long)  # a mask without padding counts as none
        model(input_ids=text_ids(2, 15, seed=3), attention_mask=all_valid, use_cache=True, **{CACHE_KWARG: cache})
        assert cache.padded_through == 18 and cache.window_is_full(16)
    cache.reset()
    assert cache.padded_through == 0 and not cache.window_is_full(16)


def test_rings_taking_another_caches_state_say_whether_it_held_tokens():
    """`share_buffers_of` copies this cache's state into the other's rings: their empty flags become this cache's
    (a ring flagged empty would let a prompt skip the tokens it holds)."""
    model = tiny_model()
    config = model.config.text_config
    fed = model(input_ids=text_ids(1, 9), use_cache=True).past_key_values.to_static()
    slot = InfiniteVLCache.empty_static(config, 1, torch.float32, torch.device("cpu"))
    slot.start_fresh_(torch.zeros(1, dtype=torch.long))
    rings = [layer for layer in slot.layers if isinstance(layer, InfiniteVLRingAttentionLayer)]
    assert rings and all(layer.empty for layer in rings)
    fed.share_buffers_of(slot)
    assert not any(layer.empty for layer in fed.layers if isinstance(layer, InfiniteVLRingAttentionLayer))
