"""`infinitevl stream` functions: a video with timed and final questions, saving and resuming the state."""

import json

import numpy as np
import pytest

from infinitevl_hf.streaming_cli import main


def write_clip(path, frames=16, rate=8):
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 15 * i, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def test_stream_cli_asks_saves_and_resumes(tiny_stream_dir, tmp_path, capsys):
    clip = write_clip(tmp_path / "clip.mp4")
    state = tmp_path / "state"
    args = [str(tiny_stream_dir), "--video", str(clip), "--fps", "4", "--ask", "1:What now?", "--ask", "Summary?",
            "--max-new-tokens", "3", "--device", "cpu", "--save-state", str(state), "--json"]
    assert main(args) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds == ["answer", "stream_end", "answer", "saved"]
    assert events[0]["question"] == "What now?" and events[1]["frames"] == 8
    assert main([str(tiny_stream_dir), "--load-state", str(state), "--ask", "Again?", "--max-new-tokens", "2",
                 "--device", "cpu", "--json"]) == 0
    resumed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert resumed[0]["frames"] == 8 and resumed[0]["tokens_seen"] == events[1]["tokens_seen"]


def test_save_state_into_an_existing_folder_is_refused_before_the_video(tiny_stream_dir, tmp_path, capsys, monkeypatch):
    import infinitevl_hf.streaming as streaming

    clip = write_clip(tmp_path / "clip.mp4")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    decoded = []
    monkeypatch.setattr(streaming, "iter_video_frames", lambda *a, **k: decoded.append(1) or iter(()))
    assert main([str(tiny_stream_dir), "--video", str(clip), "--device", "cpu", "--save-state", str(tmp_path / "taken")]) == 2
    captured = capsys.readouterr()
    assert decoded == [] and captured.out == ""
    errors = [line for line in captured.err.splitlines() if line.strip()]
    assert len(errors) == 1 and "exists (pass --overwrite to replace it)" in errors[0]
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_missing_local_model_is_folder_not_found(tmp_path, capsys):
    assert main(["./no-such-model", "--video", "x.mp4"]) == 2
    assert capsys.readouterr().err.strip() == "error: model folder not found: './no-such-model'"


def test_progress_quiet_random_answers_and_a_resumed_clock(tiny_stream_dir, tmp_path, capsys):
    clip = write_clip(tmp_path / "clip.mp4")  # 16 frames at 8/s: 2 s
    state = tmp_path / "state"
    assert main([str(tiny_stream_dir), "--video", str(clip), "--fps", "4", "--ask", "Now?", "--max-new-tokens", "2",
                 "--device", "cpu", "--save-state", str(state)]) == 0
    captured = capsys.readouterr()
    assert "feeding video" in captured.err  # progress while the video decodes and feeds
    assert "A: '" in captured.out and "(random weights: the text is meaningless)" in captured.out
    assert main([str(tiny_stream_dir), "--video", str(clip), "--load-state", str(state), "--ask", "3:Later?",
                 "--max-new-tokens", "2", "--device", "cpu", "--json", "--quiet"]) == 0
    captured = capsys.readouterr()
    events = [json.loads(line) for line in captured.out.splitlines()]
    end = next(e for e in events if e["event"] == "stream_end")
    assert end["frames"] == 16 and end["seconds"] == pytest.approx(2.0 + 1.75)  # 8 frames at 4/s before, then 0..1.75
    answer = next(e for e in events if e["event"] == "answer")
    assert answer["seconds"] == pytest.approx(2.0 + 1.0) and answer["random_weights"] is True  # --ask 3: on the stream's clock
    assert "feeding video" not in captured.err and "Loading weights" not in captured.err
