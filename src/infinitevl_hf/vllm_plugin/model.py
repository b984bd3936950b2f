"""`InfiniteVLForConditionalGeneration` for vLLM: Qwen2.5-VL's vision tower and multimodal plumbing (image and
video inputs, mRoPE positions) around InfiniteVL's hybrid decoder, with vLLM's hybrid (attention + Gated
DeltaNet state) cache."""

from __future__ import annotations

from . import require_vllm
from .compat import use_pil_qwen2_vl_image_processing

require_vllm()  # a clear ImportError when vLLM is missing
use_pil_qwen2_vl_image_processing()  # before vLLM's Qwen2.5-VL code is imported

from collections.abc import Iterable

import torch
from torch import nn
from vllm.model_executor.layers.fusion.mm_input_norm import build_mm_input_norm
from vllm.model_executor.layers.mamba.mamba_utils import (
    MambaStateCopyFuncCalculator,
    MambaStateDtypeCalculator,
    MambaStateShapeCalculator,
)
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VisionTransformer,
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
)
from vllm.model_executor.models.utils import maybe_prefix
from vllm.config import VllmConfig
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.platforms import current_platform

from .checks import check_servable
from .gated_deltanet import GatedDeltaNetShape
from .processing import InfiniteVLMultiModalProcessor, InfiniteVLProcessingInfo
from .text_model import InfiniteVLForCausalLM

# Checkpoint prefixes of the vision tower and the text model: transformers 5's naming, then transformers 4.5x's.
VISION_PREFIXES = ("model.visual.", "visual.")
TEXT_PREFIXES = ("model.language_model.", "model.")


@MULTIMODAL_REGISTRY.register_processor(
    InfiniteVLMultiModalProcessor, info=InfiniteVLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class InfiniteVLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration, IsHybrid, HasInnerState):
    """InfiniteVL served by vLLM: `visual` is vLLM's Qwen2.5-VL vision tower, `language_model` the hybrid
    decoder (`InfiniteVLForCausalLM`). Everything multimodal (input parsing, feature merging, mRoPE positions)
    is inherited from vLLM's Qwen2.5-VL model."""

    # Normalisation stays in the processor: the frame video processor cannot hand raw pixels to the device.
    supports_mm_device_do_normalize = False
    # Inherited from Qwen2.5-VL but not implemented (pipeline stages) or not tested for the hybrid decoder.
    supports_pp = False
    supports_lora = False
    supports_eagle = False
    supports_eagle3 = False
    supports_multimodal_pruning = False

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config
        check_servable(config, vllm_config.model_config.dtype, on_cpu=current_platform.is_cpu())
        if vllm_config.speculative_config is not None:
            # vLLM's speculative GDN paths fuse the output norm over the served d_k-wide heads, not InfiniteVL's d_v.
            raise ValueError("The InfiniteVL vLLM plugin does not support speculative decoding.")
        multimodal_config = vllm_config.model_config.get_multimodal_config()
        self.config = config
        self.model_config = vllm_config.model_config
        self.vllm_config = vllm_config
        self.multimodal_config = multimodal_config
        self.use_data_parallel = multimodal_config.mm_encoder_tp_mode == "data"
        self.video_pruning_rate = multimodal_config.video_pruning_rate
        self.is_multimodal_pruning_enabled = multimodal_config.is_multimodal_pruning_enabled()
        with self._mark_tower_model(vllm_config, {"image", "video"}):
            self.visual = Qwen2_5_VisionTransformer(
                vision_config=config.vision_config,
                norm_eps=config.text_config.rms_norm_eps,
                quant_config=self.quant_config,
                input_norm=build_mm_input_norm(self.model_config),  # the identity: normalised by the processor
                prefix=maybe_prefix(prefix, "visual"),
            )
        with self._mark_language_model(vllm_config):
            self.language_model = InfiniteVLForCausalLM(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "language_model"))
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load a checkpoint under either official naming (`model.visual.*`/`model.language_model.*` or
        `visual.*`/`model.*`); a tensor that belongs nowhere, or a parameter no tensor fills, is refused."""
        vision, text = [], []
        for name, tensor in weights:
            if name.startswith(VISION_PREFIXES):
                vision.append((name.split("visual.", 1)[1], tensor))
            elif name.startswith(TEXT_PREFIXES):
                rest = name.removeprefix("model.language_model.") if name.startswith("model.language_model.") else name.removeprefix("model.")
                text.append((f"model.{rest}", tensor))
            elif name == "lm_head.weight":
                text.append((name, tensor))
            else:
                raise ValueError(f"Unexpected tensor `{name}` in the InfiniteVL checkpoint.")
        loaded = {f"visual.{n}" for n in self.visual.load_weights(vision)}
        loaded |= {f"language_model.{n}" for n in self.language_model.load_weights(text)}
        missing = sorted({name for name, _ in self.named_parameters()} - loaded)
        if missing:  # vLLM would leave them as allocated: refuse instead
            raise ValueError(f"The checkpoint lacks {len(missing)} tensors of the model, e.g. {missing[:5]}.")
        return loaded

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype, torch.dtype]:
        """(conv state, recurrent state) dtypes: the model dtype unless `--mamba-cache-dtype` /
        `--mamba-ssm-cache-dtype` say otherwise."""
        cache = vllm_config.cache_config
        return MambaStateDtypeCalculator.gated_delta_net_state_dtype(
            vllm_config.model_config.dtype, cache.mamba_cache_dtype, cache.mamba_ssm_cache_dtype
        )

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(conv state, recurrent state) shapes of one Gated DeltaNet layer, as served (value heads split to d_k)."""
        shape = GatedDeltaNetShape.from_text_config(vllm_config.model_config.hf_text_config)
        spec = vllm_config.speculative_config
        return MambaStateShapeCalculator.gated_delta_net_state_shape(
            vllm_config.parallel_config.tensor_parallel_size,
            shape.linear_num_key_heads,
            shape.linear_num_value_heads,
            shape.linear_key_head_dim,
            shape.linear_value_head_dim,
            shape.linear_conv_kernel_dim,
            spec.num_speculative_tokens if spec else 0,
        )

    @classmethod
    def get_mamba_state_copy_func(cls):
        return MambaStateCopyFuncCalculator.gated_delta_net_state_copy_func()
