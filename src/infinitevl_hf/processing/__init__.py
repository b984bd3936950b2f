"""Processor: text + images/videos -> model inputs (Qwen2.5-VL processing with InfiniteVL's checks)."""

from .processing_infinitevl import InfiniteVLFrameVideoProcessor, InfiniteVLProcessor, read_video

__all__ = ["InfiniteVLFrameVideoProcessor", "InfiniteVLProcessor", "read_video"]
