"""Registers InfiniteVL with transformers' Auto classes (run once, on `import infinitevl_hf`)."""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .modeling import (
    InfiniteVLConfig,
    InfiniteVLForConditionalGeneration,
    InfiniteVLTextConfig,
    InfiniteVLTextModel,
    InfiniteVLVisionConfig,
)
from .modeling.modeling_infinitevl import InfiniteVLQwen2_5_VLForConditionalGeneration
from .processing import InfiniteVLProcessor

__all__ = ["InfiniteVLQwen2_5_VLForConditionalGeneration", "register"]


def register() -> None:
    for config in (InfiniteVLConfig, InfiniteVLTextConfig, InfiniteVLVisionConfig):
        AutoConfig.register(config.model_type, config, exist_ok=True)
    AutoModel.register(InfiniteVLConfig, InfiniteVLForConditionalGeneration, exist_ok=True)
    AutoModel.register(InfiniteVLTextConfig, InfiniteVLTextModel, exist_ok=True)
    AutoModelForImageTextToText.register(InfiniteVLConfig, InfiniteVLForConditionalGeneration, exist_ok=True)
    AutoModelForCausalLM.register(InfiniteVLConfig, InfiniteVLForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(InfiniteVLConfig, InfiniteVLProcessor, exist_ok=True)
