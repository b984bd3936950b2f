"""Unlimited streaming video understanding: `StreamingSession` feeds frames into one constant-size cache.

How frames become tokens. Frames are buffered until `frames_per_chunk` of them (a multiple of the
vision tower's `temporal_patch_size`, 2) are waiting; that chunk then goes through the video processor
as one video of `frames_per_chunk / 2` temporal steps and through the model with the session's cache, as

    <|vision_start|> <|video_pad|> * (t * h * w / 4) <|vision_end|>

so the default (2 frames per chunk) gives one video grid with t = 1 per pair of frames. Positions are
those of the model (`positions.mrope_position_ids`), continued from `cache.next_positions`: every chunk
and every piece of text starts one past the largest position before it, and inside a chunk of t > 1
steps the time axis advances `tokens_per_second * second_per_grid_ts` per step, with
`second_per_grid_ts` = `temporal_patch_size` x the spacing of the chunk's timestamps (or `1 / fps`).
A leftover frame (odd count) waits for its partner; `flush()` feeds it with the last frame repeated
(what the Qwen2.5-VL video processor does), and `ask()` sees it the same way, on its fork only.

How `ask` works. The cache is forked (`InfiniteVLCache.fork`, a deep copy); waiting frames and the
chat-formatted question `<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n` go into the fork,
and `model.generate` continues on it. The fork's token counter is restarted at 0 first: generate then
treats the question as the whole prompt (`prepare_inputs_for_generation` feeds `input_ids[:, seen:]`),
while the positions (`next_positions`) and every layer's window and state still hold the stream. So an
answer costs O(question + answer) whatever the stream length, and the session itself is untouched.

The pieces: `stream_buffer.FrameBuffer` (waiting frames, chunking, the clock), `stream_stats` (`StreamStats`, the
chunk timer), `stream_state` (the state folder; the cache's part is `InfiniteVLCache.state_dict`), `stream_video`
(`iter_video_frames`).

Example:

```python
>>> session = StreamingSession(model, processor)
>>> session.add_video("clip.mp4", fps=2)           # or add_frames([...]) from a camera, call after call
>>> session.ask("What happened so far?", max_new_tokens=64)
>>> session.stats.cache_bytes                       # the same after 10 frames as after 100,000
>>> session.save("state/"); StreamingSession.load("state/", model, processor)  # resume elsewhere
```
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .modeling.cache import InfiniteVLCache
from .modeling.compat import CACHE_KWARG
from .speed.graph_capture import CUDAGraphPrefill
from .speed.frame_graphs import CUDAGraphFrames
from .modeling.modeling_infinitevl import text_position_ids
from .stream_buffer import Frame, FrameBuffer, checked_frames
from .stream_state import (
    MAX_FRAME_PIXELS,
    STATE_JSON,  # noqa: F401  (the manifest name, imported from here by callers)
    config_fingerprint,
    load_session_state,
    save_session_state,
)
from .stream_stats import ChunkTimer, StreamStats
from .stream_video import iter_video_frames

QUESTION_TEMPLATE = "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


class StreamingSession:
    """An endless video/text stream held in one `InfiniteVLCache`, with questions answered on forks.

    Args:
        model: an `InfiniteVLForConditionalGeneration` (any device/dtype; fp32 for exactness tests).
        processor: its `InfiniteVLProcessor` (tokenizer + frame/video processor).
        frames_per_chunk (`int`, defaults to 2): frames per model call; a multiple of `temporal_patch_size` (2).
            Each chunk is one video grid of `frames_per_chunk / 2` temporal steps.
        fps (`float`, defaults to 2.0): frame rate assumed when `add_frames` gets no timestamps.
        system_prompt (`str`, optional): fed first (and after `reset`) as a `<|im_start|>system` turn.
        question_template (`str`): how `ask` wraps a question; `{question}` is replaced.
        max_pixels / min_pixels (`int`, optional): frame resolution bounds (defaults: the processor's).
    """

    def __init__(
        self,
        model,
        processor,
        frames_per_chunk: int = 2,
        fps: float = 2.0,
        system_prompt: str | None = None,
        question_template: str = QUESTION_TEMPLATE,
        max_pixels: int | None = None,
        min_pixels: int | None = None,
        cuda_graphs: bool = True,
    ):
        temporal = int(processor.image_processor.temporal_patch_size)
        if not isinstance(frames_per_chunk, int) or frames_per_chunk < temporal or frames_per_chunk % temporal:
            raise ValueError(
                f"frames_per_chunk must be a positive multiple of the temporal patch size {temporal}, got {frames_per_chunk!r}."
            )
        if not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
            raise ValueError(f"fps must be a positive number, got {fps!r}.")
        if "{question}" not in question_template:
            raise ValueError("question_template must contain '{question}'.")
        for name, value in (("max_pixels", max_pixels), ("min_pixels", min_pixels)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_FRAME_PIXELS):
                raise ValueError(f"{name} must be a whole number of pixels in [1, {MAX_FRAME_PIXELS}], got {value!r}.")
        self.model, self.processor = model, processor
        self.frames_per_chunk, self.fps, self.temporal_patch_size = frames_per_chunk, float(fps), temporal
        self.system_prompt, self.question_template = system_prompt, question_template
        self.max_pixels, self.min_pixels = max_pixels, min_pixels
        config = model.config
        self._token_ids = {
            "start": config.vision_start_token_id,
            "video": config.video_token_id,
            "end": config.vision_end_token_id,
        }
        self.cache = InfiniteVLCache(config)
        # On CUDA, a chunk of frames of a layout seen before replays one captured graph of the whole call (vision
        # tower, embeddings, decoder); text replays a captured decoder graph for its length.
        self.cuda_graphs = cuda_graphs and all(
            kind == "linear_attention" or config.text_config.window_for_layer(i) is not None
            for i, kind in enumerate(config.text_config.layer_types)
        )
        self._graphs: dict[tuple, CUDAGraphFrames | CUDAGraphPrefill] = {}
        self._buffer = FrameBuffer(self.frames_per_chunk, self.fps)
        self._timer = ChunkTimer()
        if system_prompt:
            self.add_text(f"<|im_start|>system\n{system_prompt}<|im_end|>\n")

    # -- input ---------------------------------------------------------------------------------------------
    def add_frames(self, frames, timestamps: Iterable[float] | None = None) -> StreamStats:
        """Add frames (PIL images or [H, W, 3] uint8 arrays, one or a list) with optional timestamps in seconds.

        Every complete chunk of `frames_per_chunk` frames is fed at once; the rest waits. All frames are
        checked before anything is fed: a bad frame raises and leaves the session unchanged."""
        arrays = checked_frames(frames)
        times = self._buffer.timestamps(len(arrays), timestamps)
        with self._unchanged_on_error(feeds=self._buffer.fills_chunk(len(arrays))):
            self._buffer.add(arrays, times)
            while (chunk := self._buffer.take_chunk()) is not None:
                self._feed_chunk(self.cache, chunk)
        return self.stats

    def add_video(self, source: str | os.PathLike, fps: float | None = None, max_frames: int | None = None) -> StreamStats:
        """Decode a video file or URL with PyAV, `fps` frames per second (default: the session's), and feed
        it chunk by chunk as it decodes (memory stays bounded for endless inputs). A missing or unreadable
        source raises before anything is fed; a decode error later keeps the frames fed before it."""
        fps = self.fps if fps is None else float(fps)
        batch, times = [], []
        for frame, t in iter_video_frames(source, fps=fps, max_frames=max_frames):
            batch.append(frame)
            times.append(t)
            if len(batch) == self.frames_per_chunk:
                self.add_frames(batch, times)
                batch, times = [], []
        if batch:
            self.add_frames(batch, times)
        return self.stats

    def add_text(self, text: str) -> StreamStats:
        """Feed text into the stream as it is (no chat wrapping): subtitles, a transcript, a system turn.
        Frames waiting for a partner are fed first (padded), so the stream keeps its order."""
        if not isinstance(text, str) or not text:
            raise ValueError("add_text needs a non-empty string.")
        ids = self._encode(text)
        with self._unchanged_on_error():
            self._flush()
            self._forward(self.cache, ids)
        return self.stats

    def flush(self) -> StreamStats:
        """Feed a waiting partial chunk now, repeating its last frame to a multiple of the temporal patch size."""
        with self._unchanged_on_error():
            self._flush()
        return self.stats

    @property
    def clock(self) -> float:
        """Seconds of stream so far: one frame interval (`1 / fps`) after the last frame's timestamp (0 before any).
        A resumed session keeps it, so a new video can continue the stream's time."""
        return self._buffer.clock

    # -- questions -----------------------------------------------------------------------------------------
    def ask(self, question: str, max_new_tokens: int = 64, skip_special_tokens: bool = True, **generate_kwargs) -> str:
        """Answer `question` from everything seen so far (waiting frames included); the session is unchanged.

        Greedy by default; other `generate` arguments (`do_sample`, `temperature`, `streamer`, ...) pass through."""
        fork, ids = self._question_fork(question)
        fork.seen_tokens = 0  # generate sees the question as the whole prompt; positions/states still hold the stream
        generate_kwargs.setdefault("do_sample", False)
        generation_config = getattr(self.model, "generation_config", None)
        if generation_config is not None and generation_config.pad_token_id is None:
            generate_kwargs.setdefault("pad_token_id", self.processor.tokenizer.pad_token_id)
        with torch.no_grad():
            output = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                use_cache=True,
                **{CACHE_KWARG: fork},
                **generate_kwargs,
            )
        sequences = output.sequences if hasattr(output, "sequences") else output
        return self.processor.tokenizer.decode(sequences[0, ids.shape[1]:], skip_special_tokens=skip_special_tokens)

    def question_logits(self, question: str) -> torch.Tensor:
        """Logits [1, T, vocab] of the chat-formatted question's tokens read after the stream (on a fork)."""
        fork, ids = self._question_fork(question)
        return self._forward(fork, ids)

    # -- state ---------------------------------------------------------------------------------------------
    @property
    def stats(self) -> StreamStats:
        return StreamStats(
            frames=self._buffer.frames,
            frames_pending=len(self._buffer),
            chunks=self._timer.chunks,
            tokens_seen=self.cache.seen_tokens,
            cache_bytes=self.cache.nbytes,
            last_frame_ms=self._timer.last_frame_ms,
        )

    def fork(self) -> StreamingSession:
        """An independent copy of the session (same model and processor): feeding one leaves the other unchanged."""
        other = object.__new__(StreamingSession)
        other.__dict__.update(self.__dict__)
        other.cache = self.cache.fork()
        other._graphs = {}  # graphs are bound to this session's cache tensors
        other._buffer = self._buffer.copy(copy_frames=True)
        other._timer = replace(self._timer)
        return other

    def reset(self) -> None:
        """Forget everything (the system prompt, if any, is fed again)."""
        self.cache.reset()
        self._graphs = {}
        self._buffer, self._timer = FrameBuffer(self.frames_per_chunk, self.fps), ChunkTimer()
        if self.system_prompt:
            self.add_text(f"<|im_start|>system\n{self.system_prompt}<|im_end|>\n")

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the whole memory to folder `path`: cache tensors (`state-HEX.safetensors`) and counters, waiting
        frames and a config fingerprint (`session.json`, written last). The folder then holds the old state or the
        new one, never neither; with `overwrite` only a saved state is replaced, and other files stay untouched.
        A cache turned static for CUDA graphs is saved in its dynamic form (`InfiniteVLCache.state_dict`)."""
        session = {
            "frames": self._buffer.frames,
            "chunks": self._timer.chunks,
            "last_frame_ms": self._timer.last_frame_ms,
            "last_time": self._buffer.last_time,
            "frames_per_chunk": self.frames_per_chunk,
            "fps": self.fps,
            "system_prompt": self.system_prompt,
            "question_template": self.question_template,
            "max_pixels": self.max_pixels,
            "min_pixels": self.min_pixels,
        }
        return save_session_state(path, self.model.config, self.cache, session, self._buffer.pending, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike, model, processor, **overrides) -> StreamingSession:
        """A session resumed from `save(path)`, on `model` (which must have the config the state was saved with).
        The state is checked whole first (`stream_state.load_session_state`): a changed one raises a ValueError
        naming the field."""
        session, cache, pending = load_session_state(path, model.config, _device(model), model.dtype)
        settings = {k: session[k] for k in ("frames_per_chunk", "fps", "question_template", "max_pixels", "min_pixels")}
        settings.update(overrides)
        resumed = cls(model, processor, **settings)
        resumed.system_prompt = session.get("system_prompt")
        resumed._restore(session, cache, pending)
        return resumed

    def load_state(self, path: str | os.PathLike) -> None:
        """Replace this session's memory with the one saved at `path`. Everything is read and checked first:
        a missing/corrupt folder, a changed state or one from a different model config raises and changes nothing."""
        self._restore(*load_session_state(path, self.model.config, self._device(), self.model.dtype))

    # -- internals -----------------------------------------------------------------------------------------
    def _restore(self, session: dict, cache: InfiniteVLCache, pending: list[Frame]) -> None:
        self.cache, self._graphs = cache, {}
        # (states saved before the clock was kept: last_time None)
        self._buffer.resume(pending, session["frames"], session.get("last_time"))
        self._timer = ChunkTimer(session["chunks"], session["last_frame_ms"])

    @contextlib.contextmanager
    def _unchanged_on_error(self, feeds: bool = True) -> Iterator[None]:
        """Run a feed all or nothing: an error or Ctrl-C inside the decoder (some layers advanced, others not) puts
        back the memory and counters of before the call, so a retry feeds the same frames once.
        feeds: whether the block may run the decoder (only then is the cache copied)."""
        cache = self.cache.fork() if feeds else None
        buffer, timer = self._buffer.copy(), replace(self._timer)
        try:
            yield
        except BaseException:
            self._buffer, self._timer = buffer, timer
            if cache is not None:
                self.cache = cache
                self._graphs = {}  # captured graphs write into the cache tensors that were just dropped
            raise

    def _flush(self) -> None:
        if len(self._buffer):
            self._feed_chunk(self.cache, self._buffer.take_all())

    def _question_fork(self, question: str):
        if not isinstance(question, str) or not question.strip():
            raise ValueError("ask needs a non-empty question.")
        fork = self.cache.fork()
        if len(self._buffer):
            self._feed_chunk(fork, self._buffer.pending, timed=False)
        return fork, self._encode(self.question_template.format(question=question))

    def _device(self) -> torch.device:
        return _device(self.model)

    def _encode(self, text: str) -> torch.LongTensor:
        ids = self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor([ids], dtype=torch.long, device=self._device())

    def chunk_inputs(self, frames: list[np.ndarray], timestamps: list[float] | None = None) -> dict:
        """Model inputs of one chunk of frames: `input_ids` [1, n + 2], `pixel_values_videos`, `video_grid_thw` [1, 3],
        `second_per_grid_ts` [1]. Building one prompt from several chunks' pieces gives the same positions."""
        kwargs = {}
        if self.max_pixels is not None:
            kwargs["max_pixels"] = self.max_pixels
        if self.min_pixels is not None:
            kwargs["min_pixels"] = self.min_pixels
        video = self.processor.video_processor(videos=[list(frames)], return_tensors="pt", **kwargs)
        grid = video["video_grid_thw"]
        merge = self.model.config.vision_config.spatial_merge_size
        count = int(grid.prod()) // merge**2
        ids = [self._token_ids["start"]] + [self._token_ids["video"]] * count + [self._token_ids["end"]]
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "pixel_values_videos": video["pixel_values_videos"],
            "video_grid_thw": grid,
            "second_per_grid_ts": torch.tensor([self._seconds_per_grid(timestamps)], dtype=torch.float32),
        }

    def _seconds_per_grid(self, timestamps: list[float] | None) -> float:
        steps = [b - a for a, b in zip(timestamps or [], (timestamps or [])[1:]) if b - a > 0]
        per_frame = sum(steps) / len(steps) if steps else 1.0 / self.fps
        return self.temporal_patch_size * per_frame

    def _feed_chunk(self, cache: InfiniteVLCache, chunk: list[Frame], timed: bool = True) -> None:
        """Feed one chunk of (frame, seconds) pairs into `cache` (the session's own through its graphs when ready);
        `timed`: count and time it (the session's chunks, not a question's fork)."""
        inputs = self.chunk_inputs([array for array, _ in chunk], [t for _, t in chunk])
        device = self._device()
        with self._timer.timing(len(chunk), device) if timed else contextlib.nullcontext():
            input_ids, inputs = inputs.pop("input_ids").to(device), {k: v.to(device) for k, v in inputs.items()}
            if cache is self.cache and self._graph_ready(input_ids.shape[1], device):
                self._graph_forward(input_ids, **inputs)
            else:
                self._forward(cache, input_ids, **inputs)

    def _graph_ready(self, length: int, device: torch.device) -> bool:
        if not (self.cuda_graphs and device.type == "cuda" and self.cache.seen_tokens > 0):
            return False
        return length <= (self.cache.max_tokens_per_call or self.model.config.text_config.sliding_window)

    def _graph_forward(self, input_ids: torch.LongTensor, **inputs) -> None:
        """Feed a chunk through its captured graph (captured on first use): frames by their token layout and grid,
        text by its length."""
        if "pixel_values_videos" in inputs:
            grid = inputs["video_grid_thw"]
            key = ("frames", tuple(input_ids.flatten().tolist()), tuple(grid.flatten().tolist()))
            step = self._graphs.get(key)
            if step is None:
                step = self._graphs[key] = CUDAGraphFrames(
                    self.model, self.cache, input_ids, video_grid_thw=grid, second_per_grid_ts=inputs.get("second_per_grid_ts"))
            step(inputs["pixel_values_videos"], inputs.get("second_per_grid_ts"))
            return
        base = self.model.model
        with torch.no_grad():
            embeds, positions = base.decoder_inputs(input_ids, cache=self.cache, **inputs)
            if embeds is None:
                embeds = base.get_input_embeddings()(input_ids)
            if positions is None:
                positions = text_position_ids(None, self.cache, input_ids.shape[0], input_ids.shape[1], input_ids.device)
            step = self._graphs.get(("text", input_ids.shape[1]))
            if step is None:
                step = self._graphs[("text", input_ids.shape[1])] = CUDAGraphPrefill(self.model, self.cache, input_ids.shape[1])
            step(embeds, positions)

    def _forward(self, cache: InfiniteVLCache, input_ids: torch.LongTensor, **inputs) -> torch.Tensor:
        with torch.no_grad():
            return self.model(input_ids=input_ids, use_cache=True, **inputs, **{CACHE_KWARG: cache}).logits


def _device(model) -> torch.device:
    return next(model.parameters()).device


__all__ = ["StreamingSession", "StreamStats", "iter_video_frames", "config_fingerprint"]
