"""`FrameBuffer`: a stream's frames waiting for a full chunk, and the stream's clock.

A `StreamingSession` feeds frames `frames_per_chunk` at a time; the buffer holds the frames added but not fed yet
(with their timestamps), counts every frame added, and keeps the latest timestamp, so that frames without
timestamps continue the stream's time at `fps`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

Frame = tuple[np.ndarray, float]  # ([H, W, 3] uint8, seconds)


class FrameBuffer:
    """Frames waiting to be fed, taken out in chunks of `frames_per_chunk`, and the stream's clock.

    Attributes:
        pending (`list[tuple[np.ndarray, float]]`): (frame [H, W, 3] uint8, seconds) pairs waiting, oldest first.
        frames (`int`): frames added so far, fed or waiting.
        last_time (`float` or None): the largest timestamp added so far (None before any frame).

    ```python
    >>> buffer = FrameBuffer(frames_per_chunk=2, fps=2.0)
    >>> buffer.add(frames, buffer.timestamps(len(frames)))
    >>> while (chunk := buffer.take_chunk()) is not None:
    ...     feed(chunk)
    ```
    """

    def __init__(self, frames_per_chunk: int, fps: float):
        self.frames_per_chunk, self.fps = frames_per_chunk, fps
        self.pending: list[Frame] = []
        self.frames = 0
        self.last_time: float | None = None

    def __len__(self) -> int:
        return len(self.pending)

    @property
    def clock(self) -> float:
        """Seconds of stream so far: one frame interval (`1 / fps`) after the last frame's timestamp (0 before any)."""
        return 0.0 if self.last_time is None else self.last_time + 1.0 / self.fps

    def timestamps(self, count: int, timestamps: Iterable[float] | None = None) -> list[float]:
        """The timestamps of `count` frames about to be added: `timestamps` as floats (one per frame), or when None
        one every `1 / fps` seconds on from the frames added so far."""
        if timestamps is None:
            return [(self.frames + i) / self.fps for i in range(count)]
        times = [float(t) for t in timestamps]
        if len(times) != count:
            raise ValueError(f"Got {count} frames but {len(times)} timestamps.")
        return times

    def fills_chunk(self, count: int) -> bool:
        """Whether adding `count` frames completes a chunk."""
        return len(self.pending) + count >= self.frames_per_chunk

    def add(self, arrays: list[np.ndarray], times: list[float]) -> None:
        """Add checked frames (`checked_frames`) with their timestamps; the clock keeps the largest."""
        for array, t in zip(arrays, times):
            self.pending.append((array, t))
            self.frames += 1
            self.last_time = t if self.last_time is None else max(self.last_time, t)

    def take_chunk(self) -> list[Frame] | None:
        """The oldest `frames_per_chunk` waiting frames, taken out; None while fewer wait. (A state loaded with a
        smaller `frames_per_chunk` may hold more than one chunk: take until None.)"""
        if len(self.pending) < self.frames_per_chunk:
            return None
        chunk, self.pending = self.pending[: self.frames_per_chunk], self.pending[self.frames_per_chunk :]
        return chunk

    def take_all(self) -> list[Frame]:
        """Every waiting frame, taken out (a partial chunk, fed padded)."""
        chunk, self.pending = self.pending, []
        return chunk

    def resume(self, pending: list[Frame], frames: int, last_time: float | None) -> None:
        """Take over a saved buffer: its waiting frames, its frame count and its clock."""
        self.pending, self.frames, self.last_time = list(pending), frames, last_time

    def copy(self, copy_frames: bool = False) -> FrameBuffer:
        """An independent buffer holding the same frames (the arrays themselves copied when `copy_frames`)."""
        other = FrameBuffer(self.frames_per_chunk, self.fps)
        pending = [(array.copy(), t) for array, t in self.pending] if copy_frames else self.pending
        other.resume(pending, self.frames, self.last_time)
        return other


def checked_frames(frames) -> list[np.ndarray]:
    """Frames (PIL images or [H, W, 3] uint8 arrays; one, a list, or a [N, H, W, 3] array) as contiguous
    [H, W, 3] uint8 arrays of their own. Anything else is refused with its index named."""
    if isinstance(frames, np.ndarray) and frames.ndim == 4:
        frames = list(frames)
    elif not isinstance(frames, (list, tuple)):
        frames = [frames]
    return [_check_frame(frame, i) for i, frame in enumerate(frames)]


def _check_frame(frame, index: int) -> np.ndarray:
    """A frame as a contiguous [H, W, 3] uint8 array; anything else is refused with its index named."""
    from PIL import Image

    if isinstance(frame, Image.Image):
        return np.asarray(frame.convert("RGB"), dtype=np.uint8).copy()
    if isinstance(frame, np.ndarray):
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3 or min(frame.shape[:2]) < 1:
            raise ValueError(
                f"Frame {index}: expected an [H, W, 3] uint8 array, got shape {tuple(frame.shape)} of {frame.dtype}."
            )
        return np.ascontiguousarray(frame).copy()
    raise TypeError(f"Frame {index}: expected a PIL image or an [H, W, 3] uint8 numpy array, got {type(frame).__name__}.")


__all__ = ["FrameBuffer", "checked_frames"]
