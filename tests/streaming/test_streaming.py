"""StreamingSession: frames call by call == one prompt, ask on a fork, save/resume, constant memory, bad input."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import infinitevl_hf
from infinitevl_hf import StreamingSession
from infinitevl_hf.modeling.compat import CACHE_KWARG
from infinitevl_hf.streaming import STATE_JSON

QUESTION = "What is in the video?"


def frames(count, seed=0, size=(56, 56)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(count)]


def cache_tensors(cache):
    """Every tensor and counter of an InfiniteVLCache, by name."""
    out = {"seen_tokens": cache.seen_tokens, "next_positions": cache.next_positions}
    for i, layer in enumerate(cache.layers):
        for name in ("keys", "values", "valid", "cumulative_length"):
            if hasattr(layer, name):
                out[f"{i}.{name}"] = getattr(layer, name)
        for name in ("conv_states", "recurrent_states", "has_previous_state"):
            for j, value in getattr(layer, name, {}).items():
                out[f"{i}.{name}.{j}"] = value
    return out


def assert_same_state(a, b):
    ta, tb = cache_tensors(a), cache_tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        if isinstance(ta[key], torch.Tensor):
            assert torch.equal(ta[key], tb[key]), key
        else:
            assert ta[key] == tb[key], key


def one_prompt(session, pieces, model):
    """One forward over the same pieces (chunks' tokens/pixels, text ids) in the same order."""
    ids = torch.cat([p["input_ids"] for p in pieces], dim=1)
    videos = [p for p in pieces if "video_grid_thw" in p]
    with torch.no_grad():
        return model(
            input_ids=ids,
            pixel_values_videos=torch.cat([p["pixel_values_videos"] for p in videos]),
            video_grid_thw=torch.cat([p["video_grid_thw"] for p in videos]),
            second_per_grid_ts=torch.cat([p["second_per_grid_ts"] for p in videos]),
            use_cache=True,
        )


@pytest.mark.parametrize("frames_per_chunk", [2, 4])
def test_frames_call_by_call_equal_one_prompt(model, processor, frames_per_chunk):
    session = StreamingSession(model, processor, frames_per_chunk=frames_per_chunk, fps=4.0)
    video = frames(11)
    times = [0.25 * i for i in range(11)]
    for i in range(6):
        session.add_frames(video[i], timestamps=[times[i]])
    session.add_text("Subtitle: a cat.")  # feeds any waiting frames first (with 4 per chunk: frames 4-5)
    for i in range(6, 11):  # ends with a waiting frame (odd), which ask sees padded
        session.add_frames([video[i]], timestamps=[times[i]])
    assert session.stats.frames == 11 and session.stats.frames_pending == 5 % frames_per_chunk

    def chunks(lo, hi):
        return [
            session.chunk_inputs(video[s : min(s + frames_per_chunk, hi)], times[s : min(s + frames_per_chunk, hi)])
            for s in range(lo, hi, frames_per_chunk)
        ]

    question = session._encode(session.question_template.format(question=QUESTION)).cpu()
    pieces = chunks(0, 6) + [{"input_ids": session._encode("Subtitle: a cat.").cpu()}] + chunks(6, 11)
    pieces.append({"input_ids": question})
    reference = one_prompt(session, pieces, model)
    streamed = session.question_logits(QUESTION)
    torch.testing.assert_close(streamed, reference.logits[:, -question.shape[1] :], rtol=1e-4, atol=1e-4)
    # Positions continued exactly as in the one prompt; the fork (not the session) holds the question.
    fork_positions = reference[CACHE_KWARG].next_positions
    assert session.cache.next_positions.item() < fork_positions.item()
    answer = session.ask(QUESTION, max_new_tokens=1, skip_special_tokens=False)
    assert answer == processor.tokenizer.decode([int(reference.logits[0, -1].argmax())])


def test_time_axis_follows_timestamps(model, processor):
    """Inside a chunk of 2 temporal steps the time axis advances tokens_per_second * seconds per step."""
    fast, slow = (StreamingSession(model, processor, frames_per_chunk=4) for _ in range(2))
    fast.add_frames(frames(4), timestamps=[0, 0.5, 1.0, 1.5])  # 1 s per grid step -> +2 positions
    slow.add_frames(frames(4), timestamps=[0, 2, 4, 6])  # 4 s per grid step -> +8 positions
    # 56x56 frames: 2x2 merged grid; next = max(t-pos, h, w) + 1 plus vision start/end tokens.
    assert fast.cache.next_positions.item() == 1 + max(2, 1) + 1 + 1
    assert slow.cache.next_positions.item() == 1 + 8 + 1 + 1


def asked_twice(model, processor):
    """A session with one waiting frame, its state before asking, and two answers to the same question."""
    session = StreamingSession(model, processor)
    session.add_frames(frames(7))  # one frame waits
    before = session.cache.fork()
    pending = [a.copy() for a, _ in session._buffer.pending]
    first = session.ask(QUESTION, max_new_tokens=6, skip_special_tokens=False)
    second = session.ask(QUESTION, max_new_tokens=6, skip_special_tokens=False)
    return session, before, pending, first, second


def test_ask_twice_gives_the_same_answer(model, processor):
    _, _, _, first, second = asked_twice(model, processor)
    assert first == second and len(first) > 0


def test_ask_leaves_the_cache_untouched(model, processor):
    session, before, _, _, _ = asked_twice(model, processor)
    assert_same_state(session.cache, before)


def test_ask_leaves_the_waiting_frames_untouched(model, processor):
    session, _, pending, _, _ = asked_twice(model, processor)
    assert all(np.array_equal(a, b) for a, (b, _) in zip(pending, session._buffer.pending))
    assert session.stats.frames == 7 and session.stats.frames_pending == 1


def test_ask_passes_sampling_kwargs_to_generate(model, processor):
    session, _, _, _, _ = asked_twice(model, processor)
    # Sampling kwargs pass through to generate.
    assert isinstance(session.ask(QUESTION, max_new_tokens=3, do_sample=True, top_k=5), str)


def test_a_sampling_ask_leaves_the_cache_untouched(model, processor):
    session, before, _, _, _ = asked_twice(model, processor)
    session.ask(QUESTION, max_new_tokens=3, do_sample=True, top_k=5)
    assert_same_state(session.cache, before)


def test_a_fork_streams_on_without_changing_the_session(model, processor):
    session = StreamingSession(model, processor)
    session.add_frames(frames(4))
    other = session.fork()
    other.add_frames(frames(2, seed=1))
    assert session.stats.frames == 4 and other.stats.frames == 6


def test_reset_empties_the_session(model, processor):
    session = StreamingSession(model, processor)
    session.add_frames(frames(4))
    other = session.fork()
    other.add_frames(frames(2, seed=1))
    session.reset()
    assert session.stats.tokens_seen == 0 and session.stats.frames == 0 and session.cache.next_positions is None


def test_save_load_in_fresh_process_resumes_bit_identically(model, processor, tiny_stream_dir, tmp_path):
    session = StreamingSession(model, processor, system_prompt="You watch videos.")
    session.add_frames(frames(5))  # one frame waits: it is saved too
    state = session.save(tmp_path / "state")
    with pytest.raises(FileExistsError, match="exists"):
        session.save(tmp_path / "state")
    session.add_frames(frames(3, seed=7))
    expected = session.ask(QUESTION, max_new_tokens=5, skip_special_tokens=False)
    script = textwrap.dedent(
        f"""
        import json, numpy as np
        import infinitevl_hf
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from infinitevl_hf import StreamingSession
        model = AutoModelForImageTextToText.from_pretrained({str(tiny_stream_dir)!r}).eval()
        processor = AutoProcessor.from_pretrained({str(tiny_stream_dir)!r})
        session = StreamingSession.load({str(state)!r}, model, processor)
        rng = np.random.default_rng(7)
        session.add_frames([rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in range(3)])
        print(json.dumps({{"answer": session.ask({QUESTION!r}, max_new_tokens=5, skip_special_tokens=False),
                          "stats": session.stats.as_dict()}}))
        """
    )
    src = str(Path(infinitevl_hf.__file__).resolve().parents[1])  # the package may not be installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["answer"] == expected
    stats = session.stats.as_dict()
    for key in ("frames", "frames_pending", "chunks", "tokens_seen", "cache_bytes"):
        assert got["stats"][key] == stats[key], key
    # In-process load: every cache tensor equal.
    resumed = StreamingSession.load(state, model, processor)
    resumed.add_frames(frames(3, seed=7))
    assert_same_state(resumed.cache, session.cache)


def test_cache_bytes_constant_over_many_windows(model, processor):
    session = StreamingSession(model, processor)
    video = frames(4, size=(28, 28))
    session.add_frames([video[i % 4] for i in range(10)])
    after_10 = session.stats.cache_bytes
    assert session.stats.tokens_seen > 16  # several windows already
    session.add_frames([video[i % 4] for i in range(190)])
    stats = session.stats
    assert stats.frames == 200 and stats.cache_bytes == after_10 and stats.tokens_seen > 10 * 16
    assert stats.last_frame_ms is not None and stats.last_frame_ms > 0


def test_add_video_file(model, processor, tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(16):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 15 * i, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    session = StreamingSession(model, processor)
    stats = session.add_video(path, fps=2)  # 2 s at 2 fps
    assert stats.frames == 4 and stats.chunks == 2 and stats.frames_pending == 0


def test_bad_input_leaves_state_unchanged(model, processor, tmp_path):
    session = StreamingSession(model, processor)
    session.add_frames(frames(3))
    before = session.cache.fork()
    with pytest.raises(FileNotFoundError, match="Video file not found"):
        session.add_video(tmp_path / "missing.mp4")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video at all" * 10)
    with pytest.raises(ValueError, match="Cannot read video"):
        session.add_video(garbage)
    with pytest.raises(TypeError, match="Frame 1: expected a PIL image"):
        session.add_frames([frames(1)[0], "frame.png"])
    with pytest.raises(ValueError, match=r"Frame 0: expected an \[H, W, 3\] uint8 array"):
        session.add_frames(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="2 frames but 1 timestamps"):
        session.add_frames(frames(2), timestamps=[0.0])
    with pytest.raises(ValueError, match="multiple of the temporal patch size"):
        StreamingSession(model, processor, frames_per_chunk=3)
    assert_same_state(session.cache, before)
    assert session.stats.frames == 3 and session.stats.frames_pending == 1
    session.add_frames(Image.fromarray(frames(1)[0]))  # a PIL frame completes the waiting chunk
    assert session.stats.frames_pending == 0


def test_state_from_other_config_refused(model, processor, tmp_path):
    from transformers import AutoModelForImageTextToText

    other_dir = infinitevl_hf.tiny_checkpoint(tmp_path / "other", sliding_window=32)
    other = AutoModelForImageTextToText.from_pretrained(other_dir).eval()
    foreign = StreamingSession(other, processor)
    foreign.add_frames(frames(2))
    foreign.save(tmp_path / "foreign")
    session = StreamingSession(model, processor)
    session.add_frames(frames(3))
    before = session.cache.fork()
    with pytest.raises(ValueError, match="different model config.*sliding_window: saved 32, model 16"):
        session.load_state(tmp_path / "foreign")
    with pytest.raises(ValueError, match="different model config"):
        StreamingSession.load(tmp_path / "foreign", model, processor)
    with pytest.raises(FileNotFoundError, match="No saved stream state"):
        session.load_state(tmp_path / "nowhere")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / STATE_JSON).write_text("{}")
    (tmp_path / "broken" / "state.safetensors").write_bytes(b"xx")
    with pytest.raises(ValueError, match="Cannot read the stream state"):
        session.load_state(tmp_path / "broken")
    assert_same_state(session.cache, before)
    assert session.stats.frames == 3 and session.stats.frames_pending == 1


def test_state_loaded_with_a_smaller_chunk_feeds_every_waiting_frame(model, processor, tmp_path):
    session = StreamingSession(model, processor, frames_per_chunk=4)
    session.add_frames(frames(3))  # three frames wait for a fourth
    session.save(tmp_path / "state")
    resumed = StreamingSession.load(tmp_path / "state", model, processor, frames_per_chunk=2)
    stats = resumed.add_frames(frames(1, seed=5))
    assert stats.chunks == 2 and stats.frames_pending == 0


def test_overwrite_never_deletes_a_folder_that_is_not_a_state(model, processor, tmp_path):
    session = StreamingSession(model, processor)
    session.add_frames(frames(2))
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "important.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a saved stream state"):
        session.save(precious, overwrite=True)
    assert (precious / "important.txt").read_text() == "keep me"
    session.save(tmp_path / "state")
    session.save(tmp_path / "state", overwrite=True)  # replacing an earlier state is fine
    assert (tmp_path / "state" / STATE_JSON).is_file()


def test_video_sampling_keeps_the_rate_after_a_late_start(tmp_path):
    av = pytest.importorskip("av")
    from fractions import Fraction

    from infinitevl_hf.streaming import iter_video_frames

    path = tmp_path / "late.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.time_base = Fraction(1, 30)
        for i in range(60):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 4 * i, dtype=np.uint8), format="rgb24")
            frame.pts = 42 + i  # the stream starts at 1.4 s
            frame.time_base = Fraction(1, 30)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    times = [t for _, t in iter_video_frames(path, fps=2)]
    gaps = np.diff(times)
    assert len(times) >= 3 and np.allclose(gaps, 0.5, atol=0.04), times
    with pytest.raises(ValueError, match="fps"):
        next(iter_video_frames(path, fps=float("nan")))
    with pytest.raises(ValueError, match="max_frames"):
        next(iter_video_frames(path, max_frames=0))


def test_a_state_resumes_in_the_model_dtype(model, processor, tmp_path):
    import copy

    session = StreamingSession(model, processor)
    session.add_frames(frames(4))
    session.save(tmp_path / "state")
    half = copy.deepcopy(model).to(torch.bfloat16)
    resumed = StreamingSession.load(tmp_path / "state", half, processor)
    tensors = cache_tensors(resumed.cache)
    assert all(t.dtype == torch.bfloat16 for k, t in tensors.items() if k.endswith((".keys", ".values")) or ".conv_states." in k)
    assert all(t.dtype == torch.float32 for k, t in tensors.items() if ".recurrent_states." in k and t is not None)
    assert resumed.add_frames(frames(2, seed=3)).chunks == 3  # and it keeps streaming


def ringed_and_plain(model, processor):
    """The same frames fed to a session turned to static rings after two frames and to a dynamic one."""
    ringed, plain = StreamingSession(model, processor), StreamingSession(model, processor)
    for session in (ringed, plain):
        session.add_frames(frames(2))
    ringed.cache.to_static()
    for session in (ringed, plain):
        session.add_frames(frames(10, seed=4))
    return ringed, plain


def test_a_session_on_static_rings_streams_like_a_dynamic_one(model, processor):
    """The CUDA-graph path feeds frames through static rings; on CPU the same rings run eagerly."""
    ringed, plain = ringed_and_plain(model, processor)
    torch.testing.assert_close(ringed.question_logits(QUESTION), plain.question_logits(QUESTION), rtol=1e-4, atol=1e-5)


def test_a_state_saved_from_static_rings_loads_as_a_dynamic_cache(model, processor, tmp_path):
    ringed, _ = ringed_and_plain(model, processor)
    ringed.question_logits(QUESTION)
    ringed.save(tmp_path / "state")
    resumed = StreamingSession.load(tmp_path / "state", model, processor)
    assert not resumed.cache.is_static


def test_a_state_saved_from_static_rings_resumes_like_a_dynamic_one(model, processor, tmp_path):
    ringed, plain = ringed_and_plain(model, processor)
    ringed.question_logits(QUESTION)
    ringed.save(tmp_path / "state")
    resumed = StreamingSession.load(tmp_path / "state", model, processor)
    torch.testing.assert_close(resumed.question_logits(QUESTION), plain.question_logits(QUESTION), rtol=1e-4, atol=1e-5)
