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


def ask_and_save(tiny_stream_dir, tmp_path, capsys):
    """A timed and a final question over a 2 s clip, saving the state; the events printed and the state folder."""
    clip = write_clip(tmp_path / "clip.mp4")
    state = tmp_path / "state"
    args = [str(tiny_stream_dir), "--video", str(clip), "--fps", "4", "--ask", "1:What now?", "--ask", "Summary?",
            "--max-new-tokens", "3", "--device", "cpu", "--save-state", str(state), "--json"]
    assert main(args) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return events, state


def test_stream_cli_answers_the_timed_question_on_the_way_then_saves(tiny_stream_dir, tmp_path, capsys):
    events, _ = ask_and_save(tiny_stream_dir, tmp_path, capsys)
    kinds = [e["event"] for e in events]
    assert kinds == ["answer", "stream_end", "answer", "saved"]
    assert events[0]["question"] == "What now?" and events[1]["frames"] == 8


def test_stream_cli_resumes_a_saved_state_where_it_ended(tiny_stream_dir, tmp_path, capsys):
    events, state = ask_and_save(tiny_stream_dir, tmp_path, capsys)
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


def stream_and_save(tiny_stream_dir, tmp_path, capsys):
    """One plain-text run over a 2 s clip that saves its state; what it printed, the clip and the state folder."""
    clip = write_clip(tmp_path / "clip.mp4")  # 16 frames at 8/s: 2 s
    state = tmp_path / "state"
    assert main([str(tiny_stream_dir), "--video", str(clip), "--fps", "4", "--ask", "Now?", "--max-new-tokens", "2",
                 "--device", "cpu", "--save-state", str(state)]) == 0
    return capsys.readouterr(), clip, state


def resume_quietly(tiny_stream_dir, tmp_path, capsys):
    """The same clip streamed again, quietly and as JSON, after the saved state; what the second run printed."""
    _, clip, state = stream_and_save(tiny_stream_dir, tmp_path, capsys)
    assert main([str(tiny_stream_dir), "--video", str(clip), "--load-state", str(state), "--ask", "3:Later?",
                 "--max-new-tokens", "2", "--device", "cpu", "--json", "--quiet"]) == 0
    captured = capsys.readouterr()
    return captured, [json.loads(line) for line in captured.out.splitlines()]


def test_stream_cli_shows_progress_while_feeding(tiny_stream_dir, tmp_path, capsys):
    captured, _, _ = stream_and_save(tiny_stream_dir, tmp_path, capsys)
    assert "feeding video" in captured.err  # progress while the video decodes and feeds


def test_stream_cli_answers_say_the_weights_are_random(tiny_stream_dir, tmp_path, capsys):
    captured, _, _ = stream_and_save(tiny_stream_dir, tmp_path, capsys)
    assert "A: '" in captured.out and "(random weights: the text is meaningless)" in captured.out


def test_a_resumed_stream_continues_the_saved_clock(tiny_stream_dir, tmp_path, capsys):
    _, events = resume_quietly(tiny_stream_dir, tmp_path, capsys)
    end = next(e for e in events if e["event"] == "stream_end")
    assert end["frames"] == 16 and end["seconds"] == pytest.approx(2.0 + 1.75)  # 8 frames at 4/s before, then 0..1.75
    answer = next(e for e in events if e["event"] == "answer")
    assert answer["seconds"] == pytest.approx(2.0 + 1.0)  # --ask 3: on the stream's clock


def test_stream_cli_json_answers_say_the_weights_are_random(tiny_stream_dir, tmp_path, capsys):
    _, events = resume_quietly(tiny_stream_dir, tmp_path, capsys)
    answer = next(e for e in events if e["event"] == "answer")
    assert answer["random_weights"] is True


def test_quiet_silences_the_progress_bars(tiny_stream_dir, tmp_path, capsys):
    captured, _ = resume_quietly(tiny_stream_dir, tmp_path, capsys)
    assert "feeding video" not in captured.err and "Loading weights" not in captured.err
