"""infinitevl-hf: InfiniteVL (sliding-window attention + Gated DeltaNet VLM) for Hugging Face Transformers.

Importing the package registers the config and model with AutoConfig, AutoModel,
AutoModelForImageTextToText and AutoModelForCausalLM.
"""

from .modeling import (
    InfiniteVLCache,
    InfiniteVLConfig,
    InfiniteVLForConditionalGeneration,
    InfiniteVLModel,
    InfiniteVLPreTrainedModel,
    InfiniteVLTextConfig,
    InfiniteVLTextModel,
    InfiniteVLVisionConfig,
)
from .processing import InfiniteVLProcessor
from .registration import InfiniteVLQwen2_5_VLForConditionalGeneration, register
from .streaming import StreamingSession, StreamStats
from .tiny import tiny_checkpoint
from . import export  # noqa: E402,F401 - installs the model-card writer used by save_pretrained

register()

__version__ = "0.1.0"

__all__ = [
    "InfiniteVLCache",
    "InfiniteVLConfig",
    "InfiniteVLForConditionalGeneration",
    "InfiniteVLModel",
    "InfiniteVLPreTrainedModel",
    "InfiniteVLProcessor",
    "InfiniteVLQwen2_5_VLForConditionalGeneration",
    "InfiniteVLTextConfig",
    "InfiniteVLTextModel",
    "InfiniteVLVisionConfig",
    "StreamStats",
    "StreamingSession",
    "tiny_checkpoint",
]
