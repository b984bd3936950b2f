"""What a streaming session reports: `StreamStats`, and `ChunkTimer`, which counts and times the chunks fed."""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from collections.abc import Iterator

import torch


@dataclass
class StreamStats:
    """What a session has taken in so far.

    frames: frames added (fed or waiting); frames_pending: frames waiting for a full chunk; chunks: chunks fed;
    tokens_seen: tokens through the cache (frames and text); cache_bytes: `InfiniteVLCache.nbytes` (constant
    once every window is full); last_frame_ms: wall time per frame of the last chunk fed (None before any)."""

    frames: int
    frames_pending: int
    chunks: int
    tokens_seen: int
    cache_bytes: int
    last_frame_ms: float | None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ChunkTimer:
    """Chunks fed into a session's cache, and the wall time per frame of the last one (None before any)."""

    chunks: int = 0
    last_frame_ms: float | None = None

    @contextlib.contextmanager
    def timing(self, frames: int, device: torch.device) -> Iterator[None]:
        """Time the feed of one chunk of `frames` frames run inside the block (on CUDA, until its last kernel ends).
        The chunk counts only when the block completes."""
        start = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.chunks += 1
        self.last_frame_ms = (time.perf_counter() - start) * 1000.0 / frames


__all__ = ["StreamStats", "ChunkTimer"]
