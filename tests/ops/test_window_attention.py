"""A chunk's sliding-window attention cut into three pieces merged by log-sum-exp (`ops.window_attention`)
equals attention under the dense window mask: with the torch piece everywhere, with cuDNN's on a GPU."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from infinitevl_hf.modeling.attention_paths import window_attention_mask
from infinitevl_hf.modeling.ops.window_attention import (
    merge_pieces,
    piece_attention_reference,
    window_attention,
    window_attention_by_pieces,
)


def dense_window(q, k, v, window, scale, past_valid=None):
    batch, _, length, _ = q.shape
    past = window - 1
    mask = window_attention_mask(None, None, batch, length, past, window, "sdpa", q.dtype, q.device)
    if mask is None:  # (one query over a full window sees every key)
        mask = torch.ones(1, 1, length, past + length, dtype=torch.bool, device=q.device)
    if past_valid is not None:
        keys = torch.cat([past_valid, torch.ones(batch, length, dtype=torch.bool, device=q.device)], 1)
        mask = mask & keys[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True).transpose(1, 2)


@pytest.mark.parametrize("window,length", [(8, 3), (8, 7), (8, 8), (16, 9), (4, 1), (16, 16)])
@pytest.mark.parametrize("flags", [False, True])
def test_pieces_equal_the_dense_window_mask(window, length, flags):
    """T < window - 1 (all three pieces), T = window - 1 (no dense middle piece), T = window (the last query
    sees no cached key), one query; with some cached slots empty (and one batch row with none filled)."""
    torch.manual_seed(window * 100 + length)
    q = torch.randn(2, 4, length, 16, dtype=torch.float64)
    k, v = (torch.randn(2, 2, window - 1 + length, 16, dtype=torch.float64) for _ in range(2))
    past_valid = None
    if flags:
        past_valid = torch.rand(2, window - 1) > 0.4
        past_valid[1] = False  # a fresh stream: nothing cached yet
    got = window_attention_by_pieces(q, k, v, window, 0.3, piece_attention_reference, past_valid)
    torch.testing.assert_close(got, dense_window(q, k, v, window, 0.3, past_valid), rtol=1e-10, atol=1e-10)
    assert got.shape == (2, length, 4, 16)


def test_off_cuda_the_torch_piece_runs():
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 1, 12, 8), torch.randn(1, 1, 12, 8)
    torch.testing.assert_close(window_attention(q, k, v, 8, 0.5), dense_window(q, k, v, 8, 0.5), rtol=1e-5, atol=1e-5)


def test_a_piece_nobody_sees_weighs_nothing():
    out, lse = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 1)
    unseen = (torch.zeros(1, 2, 3, 4), torch.full((1, 2, 3, 1), float("-inf")))
    torch.testing.assert_close(merge_pieces(out, lse, *unseen), out.transpose(1, 2))


def test_too_many_queries_or_wrong_key_count_are_refused():
    q = torch.randn(1, 2, 9, 8)
    with pytest.raises(ValueError, match="at most 8 queries"):
        window_attention(q, torch.randn(1, 1, 16, 8), torch.randn(1, 1, 16, 8), 8, 0.5)
    with pytest.raises(ValueError, match="keys"):
        window_attention(q[:, :, :4], torch.randn(1, 1, 10, 8), torch.randn(1, 1, 10, 8), 8, 0.5)
    with pytest.raises(ValueError, match="at least 2 tokens"):  # no cached keys: nothing to cut
        window_attention(q[:, :, :1], torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8), 1, 0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("length,flags", [(4128, True), (4128, False), (8192, False), (1024, True)])
def test_cudnn_pieces_match_float64_like_bf16_sdpa_on_the_gpu(length, flags):
    from infinitevl_hf.modeling.ops.window_attention import cudnn_window_attention_usable

    torch.manual_seed(length)
    window, dev = 8192, "cuda"  # InfiniteVL-4B: 16 query heads, 2 key/value heads of 128
    q = torch.randn(1, 16, length, 128, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, window - 1 + length, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
    past_valid = None
    if flags:
        past_valid = torch.ones(1, window - 1, dtype=torch.bool, device=dev)
        past_valid[:, : window // 3] = False  # a stream's second call: the oldest slots still empty
    with torch.no_grad():
        assert cudnn_window_attention_usable(q)
        got = window_attention(q, k, v, window, 128**-0.5, past_valid).float()
        bf16 = dense_window(q, k, v, window, 128**-0.5, past_valid).float()
        exact = dense_window(q.double(), k.double(), v.double(), window, 128**-0.5, past_valid).float()
    error, bf16_error = ((got - exact).norm() / exact.norm()).item(), ((bf16 - exact).norm() / exact.norm()).item()
    report = os.environ.get("INFINITEVL_GPU_REPORT")
    if report:
        with open(report, "a") as f:
            f.write(json.dumps({"test": "cudnn_window_pieces_vs_float64", "queries": length, "flags": flags,
                                "rel_error": error, "bf16_sdpa_rel_error": bf16_error}) + "\n")
    assert torch.isfinite(got).all()
    assert error < 1e-2 and error <= 2 * bf16_error + 1e-3, (error, bf16_error)
