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
