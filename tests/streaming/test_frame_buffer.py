"""FrameBuffer on its own (no model): chunks of frames_per_chunk in order, the clock, timestamps, copies."""

from __future__ import annotations

import numpy as np
import pytest

from infinitevl_hf.stream_buffer import FrameBuffer, checked_frames


def _frames(count):
    return [np.full((4, 4, 3), i, dtype=np.uint8) for i in range(count)]


def test_chunks_come_out_in_order_and_the_rest_waits():
    buffer = FrameBuffer(frames_per_chunk=2, fps=2.0)
    assert not buffer.fills_chunk(1) and buffer.fills_chunk(2)
    buffer.add(_frames(5), buffer.timestamps(5))
    chunks = []
    while (chunk := buffer.take_chunk()) is not None:
        chunks.append([int(array[0, 0, 0]) for array, _ in chunk])
    assert chunks == [[0, 1], [2, 3]] and len(buffer) == 1 and buffer.frames == 5
    assert [t for _, t in buffer.take_all()] == [2.0] and len(buffer) == 0 and buffer.frames == 5


def test_default_timestamps_continue_the_stream_at_fps_and_the_clock_keeps_the_latest():
    buffer = FrameBuffer(frames_per_chunk=2, fps=4.0)
    assert buffer.clock == 0.0
    buffer.add(_frames(2), buffer.timestamps(2))
    assert buffer.timestamps(2) == [0.5, 0.75] and buffer.clock == 0.5
    buffer.add(_frames(2), [3.0, 1.0])  # out of order: the clock keeps the largest
    assert buffer.last_time == 3.0 and buffer.clock == 3.25
    with pytest.raises(ValueError, match="Got 2 frames but 1 timestamps"):
        buffer.timestamps(2, [0.0])


def test_a_copy_is_independent():
    buffer = FrameBuffer(frames_per_chunk=4, fps=2.0)
    buffer.add(_frames(3), buffer.timestamps(3))
    shallow, deep = buffer.copy(), buffer.copy(copy_frames=True)
    buffer.add(_frames(1), [9.0])
    assert buffer.take_chunk() is not None
    assert len(shallow) == len(deep) == 3 and shallow.frames == deep.frames == 3 and shallow.last_time == 1.0
    assert deep.pending[0][0] is not shallow.pending[0][0]
    assert np.array_equal(deep.pending[0][0], shallow.pending[0][0])


def test_a_loaded_buffer_with_a_smaller_chunk_gives_every_full_chunk():
    buffer = FrameBuffer(frames_per_chunk=2, fps=2.0)
    buffer.resume([(array, float(i)) for i, array in enumerate(_frames(5))], frames=5, last_time=4.0)
    sizes = []
    while (chunk := buffer.take_chunk()) is not None:
        sizes.append(len(chunk))
    assert sizes == [2, 2] and len(buffer) == 1


def test_checked_frames_accepts_one_a_list_or_a_stack_and_copies():
    stack = np.zeros((3, 4, 4, 3), dtype=np.uint8)
    assert len(checked_frames(stack)) == 3 and len(checked_frames(stack[0])) == 1
    frames = checked_frames([stack[0]])
    frames[0][0, 0, 0] = 7
    assert stack[0, 0, 0, 0] == 0
    with pytest.raises(ValueError, match=r"Frame 1: expected an \[H, W, 3\] uint8 array"):
        checked_frames([stack[0], stack[0].astype(np.float32)])
