"""What vLLM can serve of an InfiniteVL config, checked before any layer is built (one clear error each)."""

from __future__ import annotations

import torch

INFINITEVL_MODEL_TYPE = "infinite_vl"
# Head sizes vLLM's CPU attention kernels and CPU Gated DeltaNet kernels accept.
CPU_ATTENTION_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
CPU_GDN_HEAD_SIZES = (64, 128)


def gdn_value_split(text_config) -> int:
    """How many key-head-wide pieces each Gated DeltaNet value head is served as (d_v / d_k).

    The value columns of a delta-rule state evolve independently given k, g and beta, so a value head of
    width r * d_k equals r heads of width d_k that share its q, k, g and beta (grouped value heads); vLLM's
    CPU prefill kernel needs d_v == d_k, and the split is exact everywhere."""
    d_k, d_v = text_config.linear_head_dim, text_config.linear_value_head_dim
    if d_v % d_k:
        raise ValueError(
            f"vLLM serving needs the Gated DeltaNet value head dim ({d_v}) to be a multiple of the key head dim ({d_k})."
        )
    return d_v // d_k


def check_infinitevl_config(config) -> None:
    """Raise a ValueError unless `config` is an InfiniteVL config (`model_type` "infinite_vl")."""
    model_type = getattr(config, "model_type", None)
    if model_type != INFINITEVL_MODEL_TYPE:
        raise ValueError(
            f"Not an InfiniteVL checkpoint: its config is {type(config).__name__} with model_type {model_type!r}; the "
            f"InfiniteVL vLLM plugin serves checkpoints whose config.json has model_type {INFINITEVL_MODEL_TYPE!r}."
        )


def check_servable(config, dtype: torch.dtype, on_cpu: bool) -> None:
    """Raise a ValueError naming the field for every InfiniteVL config value this plugin cannot serve."""
    check_infinitevl_config(config)
    text = config.text_config
    kinds = set(text.layer_types)
    head_dim = text.hidden_size // text.num_attention_heads
    if "linear_attention" in kinds:
        if not (text.use_short_conv and text.use_gate) or text.conv_bias:
            raise ValueError(
                "vLLM serving supports Gated DeltaNet layers with short convolutions, an output gate and no conv bias "
                f"(the released layout); got use_short_conv={text.use_short_conv}, use_gate={text.use_gate}, "
                f"conv_bias={text.conv_bias}."
            )
        gdn_value_split(text)
    if not on_cpu:
        return
    if head_dim not in CPU_ATTENTION_HEAD_SIZES and kinds & {"sliding_attention", "full_attention"}:
        raise ValueError(
            f"vLLM's CPU attention supports head sizes {CPU_ATTENTION_HEAD_SIZES}; this model's attention head size "
            f"(hidden_size / num_attention_heads) is {head_dim}."
        )
    if "linear_attention" in kinds:
        if text.linear_head_dim not in CPU_GDN_HEAD_SIZES:
            raise ValueError(
                f"vLLM's CPU Gated DeltaNet kernels support key head dims {CPU_GDN_HEAD_SIZES}; this model's "
                f"`linear_head_dim` is {text.linear_head_dim}."
            )
        if dtype != torch.bfloat16:
            raise ValueError(
                f"vLLM's CPU Gated DeltaNet kernels run in bfloat16 only; got dtype {dtype}. Pass dtype='bfloat16' "
                "(`--dtype bfloat16`)."
            )
