"""The flex_attention path of chunked prefill equals attention under the dense window mask."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from infinitevl_hf.modeling.attention import window_attention_mask, window_flex_attention


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
