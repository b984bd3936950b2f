"""Video files and URLs as (frame, seconds) pairs for a stream: `iter_video_frames`, decoded with PyAV."""

from __future__ import annotations

import math
import os
from pathlib import Path
from collections.abc import Iterator

import numpy as np


def iter_video_frames(source: str | os.PathLike, fps: float | None = None, max_frames: int | None = None) -> Iterator[tuple[np.ndarray, float]]:
    """Yield (frame [H, W, 3] uint8, seconds) from a video file or an http(s)/rtsp URL, decoded with PyAV,
    keeping about `fps` frames per second (every frame when None). Opening fails with FileNotFoundError for a
    missing file and ValueError for anything PyAV cannot read, before the first frame is yielded."""
    try:
        import av
    except ImportError as error:
        raise ImportError("Reading a video needs PyAV: pip install infinitevl-hf[video]") from error
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}.")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames!r}.")
    text = str(source)
    is_url = "://" in text
    if not is_url and not Path(text).is_file():
        raise FileNotFoundError(f"Video file not found: {text!r}.")
    try:
        container = av.open(text)
        if not container.streams.video:
            container.close()
            raise ValueError("it has no video stream")
    except ValueError as error:
        raise ValueError(f"Cannot read video {text!r}: {error}.") from error
    except Exception as error:  # av.error.* (InvalidDataError, HTTP errors, ...)
        raise ValueError(f"Cannot read video {text!r}: not a readable video ({error}).") from error
    yielded, next_time = 0, 0.0
    try:
        stream = container.streams.video[0]
        for index, frame in enumerate(container.decode(stream)):
            seconds = float(frame.time) if frame.time is not None else index / float(stream.average_rate or 30)
            if fps is not None and seconds + 1e-6 < next_time:
                continue
            yield frame.to_ndarray(format="rgb24"), seconds
            yielded += 1
            if fps is not None:
                next_time = max(next_time, seconds) + 1.0 / fps
            if max_frames is not None and yielded >= max_frames:
                return
    except av.error.FFmpegError as error:
        raise ValueError(f"Cannot decode video {text!r} after {yielded} frames: {error}.") from error
    finally:
        container.close()
    if yielded == 0:
        raise ValueError(f"Cannot read video {text!r}: it has no frames.")


__all__ = ["iter_video_frames"]
