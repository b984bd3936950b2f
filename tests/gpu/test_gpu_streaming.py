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
    assert graphed._graphs and graphed.cache.is_static and not eager._graphs
    a, b = (s.question_logits("What happens?") for s in sessions)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert graphed.ask("What happens?", max_new_tokens=8) == eager.ask("What happens?", max_new_tokens=8)
    assert graphed.stats.cache_bytes == graphed.cache.nbytes
