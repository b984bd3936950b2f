"""Multimodal processing for vLLM: Qwen2.5-VL's, with InfiniteVL's config and processor.

vLLM's stock Qwen2.5-VL processing asks transformers for `Qwen2_5_VLConfig` and `Qwen2_5_VLProcessor`, whose
video processor needs torchvision. Here the config is `InfiniteVLConfig` and the processor `InfiniteVLProcessor`
(the PIL image processor and this package's frame-based video processor): same token counts, no torchvision.
"""

from __future__ import annotations

from . import require_vllm
from .compat import use_pil_qwen2_vl_image_processing

require_vllm()  # a clear ImportError when vLLM is missing
use_pil_qwen2_vl_image_processing()  # before vLLM's Qwen2.5-VL code is imported

from typing import get_type_hints

from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLMultiModalProcessor, Qwen2_5_VLProcessingInfo

from ..modeling import InfiniteVLConfig
from .checks import check_infinitevl_config
from ..processing import InfiniteVLProcessor

# What `InfiniteVLFrameVideoProcessor` takes besides the frames.
VIDEO_KWARGS = ("min_pixels", "max_pixels", "size")


class InfiniteVLProcessingInfo(Qwen2_5_VLProcessingInfo):
    """Qwen2.5-VL's processing info reading InfiniteVL's config and building InfiniteVL's processor."""

    def get_hf_config(self) -> InfiniteVLConfig:
        check_infinitevl_config(self.ctx.model_config.hf_config)
        return self.ctx.get_hf_config(InfiniteVLConfig)

    def get_hf_processor(self, **kwargs: object) -> InfiniteVLProcessor:
        return self.ctx.get_hf_processor(InfiniteVLProcessor, **kwargs)

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        # The frame video processor is not a transformers video processor (no `valid_kwargs`): it takes sizes only.
        processor = self.get_hf_processor()
        text = get_type_hints(processor.valid_processor_kwargs)["text_kwargs"].__annotations__
        return {
            "text_kwargs": set(text),
            "images_kwargs": set(processor.image_processor.valid_kwargs.__annotations__),
            "videos_kwargs": set(VIDEO_KWARGS),
        }


class InfiniteVLMultiModalProcessor(Qwen2_5_VLMultiModalProcessor):
    """Qwen2.5-VL's multimodal processor (placeholders, fields, mRoPE inputs), unchanged."""
