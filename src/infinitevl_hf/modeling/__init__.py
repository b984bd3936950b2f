"""InfiniteVL model code. Files here import only torch, transformers, each other and `speed/` (relatively: the
model calls the speed machinery from two places), so `save_pretrained` can copy them, with `speed/`, into a
checkpoint as trust_remote_code files."""

from .cache import InfiniteVLCache
from .configuration_infinitevl import InfiniteVLConfig, InfiniteVLTextConfig, InfiniteVLVisionConfig
from .modeling_infinitevl import (
    InfiniteVLForConditionalGeneration,
    InfiniteVLModel,
    InfiniteVLPreTrainedModel,
    InfiniteVLTextModel,
)

__all__ = [
    "InfiniteVLCache",
    "InfiniteVLConfig",
    "InfiniteVLTextConfig",
    "InfiniteVLVisionConfig",
    "InfiniteVLForConditionalGeneration",
    "InfiniteVLModel",
    "InfiniteVLPreTrainedModel",
    "InfiniteVLTextModel",
]
