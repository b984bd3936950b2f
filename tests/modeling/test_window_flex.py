"""The flex_attention path of chunked prefill equals attention under the dense window mask."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from infinitevl_hf.modeling.attention_paths import window_attention_mask
from infinitevl_hf.modeling.ops.window_attention.flex import window_flex_attention


@pytest.mark.parametrize("past,length,window", [(7, 8, 8), (7, 5, 8), (15, 16, 16), (3, 9, 4)])
def test_window_flex_attention_equals_the_dense_window_mask(past, length, window):
    torch.manual_seed(past + length)
    q = torch.randn(2, 4, length, 16)
    k, v = torch.randn(2, 2, past + length, 16), torch.randn(2, 2, past + length, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # uncompiled flex warns that it is a slow reference
        got = window_flex_attention(q, k, v, past, window, 0.25)
    mask = window_attention_mask(None, None, 2, length, past, window, "sdpa", q.dtype, q.device)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("step,length", [(5, 6), (21, 8), (40, 3), (13, 2)])
def test_ring_in_token_order_with_flex_equals_the_ring_under_its_dense_mask(step, length):
    """A static ring (some slots empty or padding) taking a chunk: its keys in token order through the window's
    block mask and a validity score_mod give what the ring + chunk under the dense chunk mask give, and both
    leave the ring in the same state."""
    from infinitevl_hf.modeling.cache import InfiniteVLRingAttentionLayer

    window = 8
    torch.manual_seed(step)
    keys, values = torch.randn(2, 2, window, 16), torch.randn(2, 2, window, 16)
    valid = torch.rand(2, window) > 0.3
    if step < window:
        valid[:, step:] = False  # never written yet
    rings = [InfiniteVLRingAttentionLayer(keys.clone(), values.clone(), valid.clone(), torch.tensor([step]))
             for _ in range(2)]
    q, k, v = torch.randn(2, 4, length, 16), torch.randn(2, 2, length, 16), torch.randn(2, 2, length, 16)
    new_valid = torch.ones(2, length, dtype=torch.bool)
    new_valid[1, 0] = False  # a padded token in the chunk
    dense_k, dense_v = rings[0].update(k, v, valid=new_valid)
    expected = F.scaled_dot_product_attention(q, dense_k, dense_v, attn_mask=rings[0].chunk_mask, scale=0.25,
                                              enable_gqa=True).transpose(1, 2)
    ordered_k, ordered_v, flags = rings[1].update_in_order(k, v, valid=new_valid)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = window_flex_attention(q, ordered_k, ordered_v, window - 1, window, 0.25, key_valid=flags)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    for name in ("keys", "values", "valid"):
        torch.testing.assert_close(getattr(rings[1], name), getattr(rings[0], name), rtol=0, atol=0)


@pytest.mark.parametrize("path", ["pieces", "flex"])
def test_long_chunk_paths_in_the_model_equal_the_dense_mask(monkeypatch, path):
    """The attention layer's branches that skip the keys outside the window (taken on CUDA for long chunks),
    forced on CPU for every chunk over a full window: the dynamic cache and the static rings (empty slots
    first, then full) give what the dense-mask path gives."""
    from helpers import text_ids, tiny_model

    from infinitevl_hf import InfiniteVLCache
    from infinitevl_hf.modeling import attention_paths
    from infinitevl_hf.modeling.compat import CACHE_KWARG

    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    model = tiny_model(sliding_window=8, hidden_size=64, rope_parameters=rope)  # head dim 16
    prompt, chunks = text_ids(1, 3), [text_ids(1, n, seed=10 + n) for n in (3, 6, 8, 5, 8)]  # full from the 3rd

    def run(static: bool) -> list[torch.Tensor]:
        cache = InfiniteVLCache(model.config)
        logits = []
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # uncompiled flex warns that it is a slow reference
            model(input_ids=prompt, use_cache=True, **{CACHE_KWARG: cache})
            if static:
                cache.to_static()
            for chunk in chunks:
                logits.append(model(input_ids=chunk, use_cache=True, **{CACHE_KWARG: cache}).logits)
        return logits

    expected = {static: run(static) for static in (False, True)}
    taken = []

    def forced(query, implementation, window, training, token_valid):
        taken.append(path)
        return path

    monkeypatch.setattr(attention_paths, "long_chunk_path", forced)
    for static in (False, True):
        for got, want in zip(run(static), expected[static]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert taken  # the forced branches ran


@pytest.fixture
def kernels_usable(monkeypatch):
    """The long-chunk kernels usable, as on CUDA (flex_attention and cuDNN's pieces)."""
    from infinitevl_hf.modeling import attention_paths

    monkeypatch.setattr(attention_paths, "flex_attention_usable", lambda query: True)
    monkeypatch.setattr(attention_paths, "cudnn_window_attention_usable", lambda query: True)


@pytest.mark.parametrize("token_valid,expected", [(None, "pieces"), (True, "flex")])
def test_a_long_chunk_takes_its_kernel(kernels_usable, token_valid, expected):
    from infinitevl_hf.modeling.attention_paths import LONG_CHUNK_TOKENS, long_chunk_path

    query = torch.zeros(1, 2, LONG_CHUNK_TOKENS, 8)
    valid = None if token_valid is None else torch.ones(1, LONG_CHUNK_TOKENS, dtype=torch.bool)
    assert long_chunk_path(query, "sdpa", LONG_CHUNK_TOKENS, False, valid) == expected


@pytest.mark.parametrize("how", ["prefer_reference", "env"])
def test_a_long_chunk_takes_the_dense_mask_when_the_reference_is_forced(kernels_usable, monkeypatch, how):
    """INFINITEVL_TORCH_OPS / prefer_reference() force the torch reference of every op, the long-chunk kernels too."""
    import contextlib

    from infinitevl_hf.modeling.attention_paths import LONG_CHUNK_TOKENS, long_chunk_path
    from infinitevl_hf.modeling.ops import dispatch

    if how == "env":
        monkeypatch.setenv(dispatch.TORCH_OPS_ENV, "1")
    query = torch.zeros(1, 2, LONG_CHUNK_TOKENS, 8)
    valid = torch.ones(1, LONG_CHUNK_TOKENS, dtype=torch.bool)
    with dispatch.prefer_reference() if how == "prefer_reference" else contextlib.nullcontext():
        assert long_chunk_path(query, "sdpa", LONG_CHUNK_TOKENS, False, None) is None
        assert long_chunk_path(query, "sdpa", LONG_CHUNK_TOKENS, False, valid) is None
