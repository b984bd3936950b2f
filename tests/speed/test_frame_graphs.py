"""`FrameStep`: a streamed call of a fixed layout with everything that depends on the layout precomputed (the
function `CUDAGraphFrames` captures) computes what the model's own forward computes, call after call."""

import pytest
import torch
from helpers import IMAGE_TOKEN, VIDEO_TOKEN, VISION_END, VISION_START, text_ids, tiny_model

from infinitevl_hf import InfiniteVLCache
from infinitevl_hf.modeling.compat import CACHE_KWARG
from infinitevl_hf.speed.frame_graphs import FrameStep, vision_layout


def chunk_ids(grids, token):
    """Placeholder runs for `grids` (t, h, w patches, merge 2), each between vision start/end tokens."""
    ids = []
    for t, h, w in grids:
        ids += [VISION_START] + [token] * (t * h * w // 4) + [VISION_END]
    return torch.tensor([ids])


@pytest.mark.parametrize("kind", ["image", "video"])
def test_frame_step_equals_the_model_call_by_call(kind):
    model = tiny_model()
    # two grids per call with windows of two lengths (4x4 and 2x4 patches) and a full-attention block
    grids = [(1, 4, 8), (1, 6, 4)] if kind == "image" else [(2, 4, 4), (2, 6, 4)]
    ids = chunk_ids(grids, IMAGE_TOKEN if kind == "image" else VIDEO_TOKEN)
    grid = torch.tensor(grids)
    seconds = [torch.tensor([0.5, 1.0]), torch.tensor([0.5, 1.0]), torch.tensor([1.5, 0.25])]  # videos: timing may change
    grid_key = "image_grid_thw" if kind == "image" else "video_grid_thw"
    pixel_key = "pixel_values" if kind == "image" else "pixel_values_videos"
    caches = [InfiniteVLCache(model.config), InfiniteVLCache(model.config)]
    prompt = text_ids(1, 5)
    with torch.no_grad():
        for cache in caches:
            model(input_ids=prompt, use_cache=True, **{CACHE_KWARG: cache})
        extra = {"second_per_grid_ts": seconds[0]} if kind == "video" else {}
        step = FrameStep(model, ids, **{grid_key: grid}, **extra)
        generator = torch.Generator().manual_seed(0)
        for call in range(3):
            if kind == "video":
                extra = {"second_per_grid_ts": seconds[call]}
                step.set_seconds_per_grid(seconds[call])
            pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 2 * 2, generator=generator)
            expected = model.model(input_ids=ids, **{pixel_key: pixels, grid_key: grid}, **extra, use_cache=True,
                                   **{CACHE_KWARG: caches[0]}).last_hidden_state[:, -1:]
            got = step(pixels, caches[1])
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert caches[1].seen_tokens == caches[0].seen_tokens
        torch.testing.assert_close(caches[1].next_positions, caches[0].next_positions, rtol=0, atol=0)
        token = text_ids(1, 1, seed=7)
        logits = [model(input_ids=token, use_cache=True, **{CACHE_KWARG: c}).logits for c in caches]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)


def test_frame_step_refuses_a_layout_that_does_not_match_its_grids():
    model = tiny_model()
    ids = chunk_ids([(1, 4, 4)], IMAGE_TOKEN)
    with pytest.raises(ValueError, match="4 image placeholder tokens, but the grids"):
        FrameStep(model, ids, image_grid_thw=torch.tensor([[1, 4, 8]]))
    with pytest.raises(ValueError, match="exactly one"):
        FrameStep(model, ids)


def test_vision_layout_is_what_the_tower_computes_itself():
    model = tiny_model()
    visual = model.model.visual
    grid = torch.tensor([[1, 4, 8], [2, 6, 4]])
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 2 * 2)
    layout = vision_layout(visual, grid)
    assert {"position_ids", "cu_seqlens", "window_index", "cu_window_seqlens"} <= set(layout)
    with torch.no_grad():
        expected = visual(pixels, grid_thw=grid).pooler_output
        got = visual(pixels, grid_thw=grid, **layout).pooler_output
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_frame_step_starts_a_fresh_cache_like_the_model():
    model = tiny_model()
    ids = chunk_ids([(1, 4, 4)], IMAGE_TOKEN)
    grid = torch.tensor([[1, 4, 4]])
    pixels = torch.randn(16, 3 * 2 * 2 * 2)
    caches = [InfiniteVLCache(model.config), InfiniteVLCache(model.config)]
    with torch.no_grad():
        expected = model.model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, use_cache=True,
                               **{CACHE_KWARG: caches[0]}).last_hidden_state[:, -1:]
        got = FrameStep(model, ids, image_grid_thw=grid)(pixels, caches[1])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[1].next_positions, caches[0].next_positions, rtol=0, atol=0)


def test_frame_step_feeds_batched_streams_like_the_model():
    """Rows of one call are separate streams (batched): each row's frames, positions and cache rows stay its own."""
    model = tiny_model()
    ids = chunk_ids([(1, 4, 8)], IMAGE_TOKEN).expand(2, -1).contiguous()
    grid = torch.tensor([[1, 4, 8], [1, 4, 8]])  # one grid per row, in row order
    prompt = torch.cat([text_ids(1, 5), text_ids(1, 5, seed=9)])
    caches = [InfiniteVLCache(model.config), InfiniteVLCache(model.config)]
    with torch.no_grad():
        for cache in caches:
            model(input_ids=prompt, use_cache=True, **{CACHE_KWARG: cache})
        step = FrameStep(model, ids, image_grid_thw=grid)
        for call in range(2):
            pixels = torch.randn(64, 3 * 2 * 2 * 2)
            expected = model.model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, use_cache=True,
                                   **{CACHE_KWARG: caches[0]}).last_hidden_state[:, -1:]
            torch.testing.assert_close(step(pixels, caches[1]), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected[0], expected[1])  # the rows really are different streams
    torch.testing.assert_close(caches[1].next_positions, caches[0].next_positions, rtol=0, atol=0)
