"""On CUDA, a stream's frame chunks replay a captured decoder graph and give what eager steps give."""

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_frame_steps_from_a_cuda_graph_equal_eager_steps(tmp_path):
    import infinitevl_hf
    from infinitevl_hf import StreamingSession
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = infinitevl_hf.tiny_checkpoint(tmp_path / "tiny", sliding_window=64)
    model = AutoModelForImageTextToText.from_pretrained(folder).to("cuda").eval()
    processor = AutoProcessor.from_pretrained(folder)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in range(24)]
    sessions = [StreamingSession(model, processor, cuda_graphs=flag) for flag in (True, False)]
    for session in sessions:
        session.add_text("<|im_start|>user\n")
        session.add_frames(frames)
    graphed, eager = sessions
    assert graphed.cache.is_static and not eager._graphs
    assert any(key[0] == "frames" for key in graphed._graphs)  # whole frame calls replayed from one graph
    a, b = (s.question_logits("What happens?") for s in sessions)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert graphed.ask("What happens?", max_new_tokens=8) == eager.ask("What happens?", max_new_tokens=8)
    assert graphed.stats.cache_bytes == graphed.cache.nbytes


def test_whole_frame_calls_from_one_cuda_graph_equal_the_model():
    from helpers import IMAGE_TOKEN, VISION_END, VISION_START, text_ids, tiny_model

    from infinitevl_hf import InfiniteVLCache
    from infinitevl_hf.modeling.compat import CACHE_KWARG
    from infinitevl_hf.speed.frame_graphs import CUDAGraphFrames

    model = tiny_model(sliding_window=64).to("cuda")
    grids = [(1, 4, 8), (1, 6, 4)]  # windows of two lengths, two images per call
    ids = torch.tensor([sum(([VISION_START] + [IMAGE_TOKEN] * (t * h * w // 4) + [VISION_END] for t, h, w in grids), [])],
                       device="cuda")
    grid = torch.tensor(grids, device="cuda")
    caches = [InfiniteVLCache(model.config), InfiniteVLCache(model.config)]
    with torch.no_grad():
        for cache in caches:
            model(input_ids=text_ids(1, 5).to("cuda"), use_cache=True, **{CACHE_KWARG: cache})
        step = CUDAGraphFrames(model, caches[1], ids, image_grid_thw=grid)
        graphs = []
        for call in range(6):  # the 64-token window fills after the 4th call: the graph is captured again
            pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 2 * 2, device="cuda")
            expected = model.model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, use_cache=True,
                                   **{CACHE_KWARG: caches[0]}).last_hidden_state[:, -1:]
            torch.testing.assert_close(step(pixels), expected, rtol=1e-4, atol=1e-4)
            graphs.append(step.graph)
        torch.testing.assert_close(caches[1].next_positions, caches[0].next_positions, rtol=0, atol=0)
        assert caches[1].seen_tokens == caches[0].seen_tokens
    assert graphs[3] is graphs[0] and graphs[4] is not graphs[3] and graphs[5] is graphs[4]
    assert step.full_windows == (True,)


@pytest.fixture(scope="module", params=[(torch.float32, "window_flex_attention"), (torch.bfloat16, "window_attention")],
                ids=["float32-window_flex_attention", "bfloat16-window_attention"])
def long_chunks(request):
    """float32 takes flex_attention's block mask; bf16 takes cuDNN's attention in pieces (ops.window_attention).
    Both caches take the same path once the dynamic window is full, the rings from their first long chunk."""
    from helpers import text_ids, tiny_model

    from infinitevl_hf import InfiniteVLCache
    from infinitevl_hf.modeling import attention_paths as attention
    from infinitevl_hf.modeling.compat import CACHE_KWARG

    dtype, path = request.param
    window = 2048
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    model = tiny_model(sliding_window=window, hidden_size=64, rope_parameters=rope).to("cuda", dtype)  # head dim 16
    dynamic, static = InfiniteVLCache(model.config), InfiniteVLCache(model.config)
    calls, pairs = [], []
    original = getattr(attention, path)

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(attention, path, counting)
    try:
        with torch.no_grad():
            prompt = text_ids(1, 7).to("cuda")
            for cache in (dynamic, static):
                model(input_ids=prompt, use_cache=True, **{CACHE_KWARG: cache})
            static.to_static()
            for t, size in enumerate([1500, 1100, 2048, 1024]):  # the ring empty, filling, full, wrapped
                chunk = text_ids(1, size, seed=300 + t).to("cuda")
                a = model(input_ids=chunk, use_cache=True, **{CACHE_KWARG: dynamic}).logits.float()
                b = model(input_ids=chunk, use_cache=True, **{CACHE_KWARG: static}).logits.float()
                pairs.append((a, b))
    finally:
        setattr(attention, path, original)
    return dtype, pairs, calls


def test_long_chunks_skip_the_keys_outside_the_window(long_chunks):
    _, _, calls = long_chunks
    # the rings' 4 chunks and the dynamic cache's full-window chunks, in both attention layers
    assert len(calls) >= 2 * (4 + 2), len(calls)


def test_over_long_chunks_the_static_rings_equal_the_dynamic_cache(long_chunks):
    dtype, pairs, _ = long_chunks
    for t, (a, b) in enumerate(pairs):
        if dtype == torch.float32:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        else:  # different kernels round differently in bf16
            error = ((b - a).norm() / a.norm()).item()
            assert error < 2e-2, (t, error)
