"""Configuration of InfiniteVL: a Qwen2.5-VL vision tower feeding a hybrid decoder.

The decoder mixes two token mixers, chosen per layer by `layer_types`:

- `"sliding_attention"`: the Qwen2.5-VL attention (mRoPE, q/k/v bias) restricted to a window of
  `sliding_window` tokens (a token sees itself and the `sliding_window - 1` before it);
- `"linear_attention"`: a Gated DeltaNet whose fixed-size state carries the long-range memory;
- `"full_attention"`: plain causal attention (used by conversions that keep teacher layers whole).

The released checkpoint (`InfiniteVL-4B`) stores its text fields flat at the top level of
`config.json`, has no `layer_types`, and sets `use_sliding_window: true`; `InfiniteVLConfig` reads it
as released and gives the period-4 layout (layer `i` is sliding attention when `i % 4 == 0`).
"""

from __future__ import annotations

import math

from transformers.configuration_utils import PreTrainedConfig
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLVisionConfig,
)

from .tensor_parallel import TEXT_TP_PLAN

LAYER_TYPES = ("sliding_attention", "full_attention", "linear_attention")
GDN_MODES = ("chunk", "fused_recurrent")
# rope types the mRoPE builds. "dynamic" is refused: it changes the frequencies with the length of the input, so
# a prompt fed in chunks or a stream would rotate its cached window keys differently from one shot.
ROPE_TYPES = ("default", "linear", "yarn")


def default_layer_types(num_hidden_layers: int, interval: int = 4) -> list[str]:
    """The released layout: one sliding-attention layer, then `interval - 1` Gated DeltaNet layers."""
    return ["sliding_attention" if i % interval == 0 else "linear_attention" for i in range(num_hidden_layers)]


class InfiniteVLVisionConfig(Qwen2_5_VLVisionConfig):
    r"""
    The Qwen2.5-VL vision tower and its 2x2 patch merger, unchanged. Defaults are InfiniteVL-4B's
    (32 blocks, 1280 wide, merger output 2048, full attention in blocks 7/15/23/31).
    """

    model_type = "infinite_vl_vision"
    base_config_key = "vision_config"

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    out_hidden_size: int = 2048
    tokens_per_second: int = 2
    window_size: int = 112

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_infinitevl_vision()

    def validate_infinitevl_vision(self) -> None:
        """Raise a ValueError naming the field for every value the vision tower cannot be built from."""
        _positive(self, "depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size", "spatial_merge_size")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"vision `hidden_size` ({self.hidden_size}) must be divisible by vision `num_heads` ({self.num_heads})."
            )


class InfiniteVLTextConfig(Qwen2_5_VLTextConfig):
    r"""
    The hybrid decoder. Defaults are InfiniteVL-4B's text model (Qwen2.5-VL-3B shape with 9 sliding-
    window attention layers and 27 Gated DeltaNet layers).

    Gated DeltaNet fields keep the names of the official release:

    num_linear_heads (`int`, defaults to 16): query heads of each Gated DeltaNet layer.
    num_linear_key_value_heads (`int`, defaults to 16): key/value heads (must equal `num_linear_heads`).
    linear_head_dim (`int`, defaults to 128): key head dimension `d_k`.
    expand_v (`float`, defaults to 2): value head dimension is `linear_head_dim * expand_v`.
    conv_size (`int`, defaults to 4): width of the depthwise causal convolutions on q, k and v.
    conv_bias (`bool`, defaults to False): whether those convolutions have a bias.
    use_short_conv (`bool`, defaults to True): without them q/k/v only go through SiLU.
    use_gate (`bool`, defaults to True): output `o_proj(RMSNorm(o) * SiLU(g_proj(x)))` instead of `o_proj(RMSNorm(o))`.
    norm_eps (`float`, defaults to 1e-5): epsilon of that output RMSNorm.
    mode (`str`, defaults to "chunk"): kernel for prompts ("chunk" or "fused_recurrent"); decode steps always recur.
    prefill_chunk_tokens (`int` or None, defaults to 8192): prompts longer than this run through the decoder
        in pieces of this many tokens via the cache, which bounds activation and mask memory. None: one shot.
        (Not named `prefill_chunk_size`: generate() would copy that into its own chunking, which cannot split
        images across chunks.)
    """

    model_type = "infinite_vl_text"
    base_config_key = "text_config"
    # Gated DeltaNet layers split by head (not Qwen2.5-VL's attention-only plan): see `tensor_parallel.py`.
    base_model_tp_plan = TEXT_TP_PLAN

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 2
    max_position_embeddings: int = 128000
    rms_norm_eps: float = 1e-6
    use_sliding_window: bool | None = True
    sliding_window: int | None = 8192
    max_window_layers: int | None = 70
    tie_word_embeddings: bool = True

    num_linear_heads: int = 16
    num_linear_key_value_heads: int = 16
    linear_head_dim: int = 128
    expand_v: float = 2
    conv_size: int = 4
    conv_bias: bool = False
    use_short_conv: bool = True
    use_gate: bool = True
    norm_eps: float = 1e-5
    mode: str = "chunk"
    prefill_chunk_tokens: int | None = 8192

    def __post_init__(self, **kwargs):
        # Qwen2.5-VL's own default would make every layer full attention; ours is the released layout.
        if self.layer_types is None:
            self.layer_types = default_layer_types(self.num_hidden_layers)
        # The official config asks for flash-attention 2; it is not a property of the weights, and the
        # package runs on sdpa or eager, so the choice is left to `from_pretrained(attn_implementation=...)`.
        if kwargs.get("attn_implementation") == "flash_attention_2":
            kwargs.pop("attn_implementation")
        super().__post_init__(**kwargs)
        self.validate_infinitevl()

    @property
    def linear_value_head_dim(self) -> int:
        return int(self.linear_head_dim * self.expand_v)

    def validate_infinitevl(self) -> None:
        """Raise a ValueError naming the field for every value the model cannot be built from."""
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"`layer_types` has {len(self.layer_types)} entries but `num_hidden_layers` is {self.num_hidden_layers}."
            )
        for i, kind in enumerate(self.layer_types):
            if kind not in LAYER_TYPES:
                raise ValueError(f"`layer_types[{i}]` is {kind!r}; each entry must be one of {LAYER_TYPES}.")
        _positive(self, "hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` ({self.num_attention_heads})."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be divisible by "
                f"`num_key_value_heads` ({self.num_key_value_heads})."
            )
        head_dim = self.hidden_size // self.num_attention_heads
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            why = " (it rescales with the input length, so chunked or streamed input would differ from one shot)"
            raise ValueError(
                f"`rope_parameters['rope_type']` is {rope_type!r}; InfiniteVL's mRoPE supports {ROPE_TYPES}"
                + (why if rope_type == "dynamic" else "") + "."
            )
        mrope = (self.rope_parameters or {}).get("mrope_section")
        if mrope is not None and 2 * sum(mrope) != head_dim:
            raise ValueError(f"`mrope_section` {list(mrope)} must sum to head_dim/2 = {head_dim // 2}.")
        for name in ("rms_norm_eps", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"`{name}` must be a positive number, got {value!r}.")
        if "sliding_attention" in self.layer_types and not self.use_sliding_window:
            # The released model always slides; unbounded attention is spelled out per layer instead.
            raise ValueError(
                "`use_sliding_window` is false, but `layer_types` has sliding_attention layers: InfiniteVL's attention "
                "layers keep a window. Set `use_sliding_window: true`, or name unbounded layers 'full_attention'."
            )
        if "sliding_attention" in self.layer_types:
            if self.sliding_window is None or self.sliding_window < 1:
                raise ValueError(f"`sliding_window` must be a positive number of tokens, got {self.sliding_window}.")
        if "linear_attention" in self.layer_types:
            _positive(self, "num_linear_heads", "num_linear_key_value_heads", "linear_head_dim", "conv_size")
            if self.num_linear_heads != self.num_linear_key_value_heads:
                raise ValueError(
                    f"`num_linear_heads` ({self.num_linear_heads}) must equal `num_linear_key_value_heads` "
                    f"({self.num_linear_key_value_heads}): q, k and v of a Gated DeltaNet head share one state."
                )
            value_dim = self.linear_head_dim * self.expand_v
            if self.expand_v <= 0 or not math.isclose(value_dim, round(value_dim), abs_tol=1e-6):
                raise ValueError(
                    f"`expand_v` ({self.expand_v}) times `linear_head_dim` ({self.linear_head_dim}) must be a positive "
                    f"integer value head dimension, got {value_dim}."
                )
            if self.mode not in GDN_MODES:
                raise ValueError(f"`mode` is {self.mode!r}; it must be one of {GDN_MODES}.")
        if self.prefill_chunk_tokens is not None and self.prefill_chunk_tokens < 1:
            raise ValueError(f"`prefill_chunk_tokens` must be a positive number of tokens or None, got {self.prefill_chunk_tokens}.")

    def window_for_layer(self, layer_idx: int) -> int | None:
        """Tokens an attention layer can see (itself included), or None for unbounded attention."""
        if self.layer_types[layer_idx] == "sliding_attention" and self.use_sliding_window:
            return self.sliding_window
        return None


def _positive(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is None or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value}.")


class InfiniteVLConfig(PreTrainedConfig):
    r"""
    Configuration of [`InfiniteVLForConditionalGeneration`]: `text_config` ([`InfiniteVLTextConfig`]),
    `vision_config` ([`InfiniteVLVisionConfig`]) and the special token ids of Qwen2.5-VL.

    Text fields may also be given flat at the top level, as the released `config.json` does.

    Example:

    ```python
    >>> from infinitevl_hf import InfiniteVLConfig
    >>> config = InfiniteVLConfig()
    >>> config.text_config.layer_types[:4]
    ['sliding_attention', 'linear_attention', 'linear_attention', 'linear_attention']
    ```
    """

    model_type = "infinite_vl"
    # `sub_configs` is what transformers 5.17 reads, `sub_configs_defaults` what later 5.x read.
    sub_configs = {"text_config": InfiniteVLTextConfig, "vision_config": InfiniteVLVisionConfig}
    sub_configs_defaults = {"text_config": InfiniteVLTextConfig, "vision_config": InfiniteVLVisionConfig}

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    vision_token_id: int = 151654
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if isinstance(self.vision_config, dict):
            vision = {k: v for k, v in self.vision_config.items() if k not in ("model_type", "in_chans", "spatial_patch_size")}
            self.vision_config = InfiniteVLVisionConfig(**vision)
        elif self.vision_config is None:
            self.vision_config = InfiniteVLVisionConfig()
        if isinstance(self.text_config, dict):
            text = {k: v for k, v in self.text_config.items() if k != "model_type"}
            self.text_config = InfiniteVLTextConfig(**text)
        elif self.text_config is None:
            # The released config.json keeps the text fields at the top level.
            text_fields = set(InfiniteVLTextConfig.__dataclass_fields__) | {"rope_scaling", "rope_theta"}
            text = {k: kwargs.pop(k) for k in list(kwargs) if k in text_fields}
            text.setdefault("tie_word_embeddings", self.tie_word_embeddings)
            if kwargs.get("attn_implementation") == "flash_attention_2":
                kwargs.pop("attn_implementation")
            self.text_config = InfiniteVLTextConfig(**text)
        # One source of truth for tying lm_head to the embeddings: the top-level field.
        self.text_config.tie_word_embeddings = self.tie_word_embeddings
        super().__post_init__(**kwargs)


__all__ = ["InfiniteVLConfig", "InfiniteVLTextConfig", "InfiniteVLVisionConfig", "default_layer_types"]
