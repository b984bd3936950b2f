"""Tensor parallelism (`from_pretrained(..., tp_plan="auto")`): the plan of InfiniteVL's decoder.

A Gated DeltaNet head is independent of the others until `o_proj`, so the GDN layers split by head like
attention: q/k/v/a/b/g projections column-wise (each rank computes its heads), the depthwise convolutions'
channels and the per-head `A_log` / `dt_bias` sliced with them, `o_norm` (shared by all heads, applied per head)
kept whole, and `o_proj` row-wise (the ranks' partial outputs summed). Attention and the MLP are split as in
Qwen2.5-VL; the tied `lm_head` is split over the vocabulary like `embed_tokens`. The vision tower is replicated.

transformers' styles shard `nn.Linear` and embeddings; the convolutions and the bare `A_log` / `dt_bias`
parameters take `HEAD_STYLE`, registered here: shard each of the module's own parameters on dim 0 and run its
forward on the local shards. The modules read their head counts off the tensors, so the same code runs whole
or sharded.
"""

from __future__ import annotations

import torch
from torch import nn

HEAD_STYLE = "infinitevl_heads"

# Keys relative to the text model (`InfiniteVLTextModel`); `layers.*.self_attn` is attention or Gated DeltaNet by
# `layer_types`, and each rule applies where its module exists.
TEXT_TP_PLAN = {
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise",
    "layers.*.self_attn.a_proj": "colwise",
    "layers.*.self_attn.b_proj": "colwise",
    "layers.*.self_attn.g_proj": "colwise",
    "layers.*.self_attn.q_conv1d": HEAD_STYLE,
    "layers.*.self_attn.k_conv1d": HEAD_STYLE,
    "layers.*.self_attn.v_conv1d": HEAD_STYLE,
    "layers.*.self_attn": HEAD_STYLE,  # the GDN's own parameters: A_log and dt_bias
    "layers.*.self_attn.o_proj": "rowwise",
    "layers.*.mlp.gate_proj": "colwise",
    "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise",
}


def _register_head_style() -> None:
    """Register `HEAD_STYLE` with transformers' tensor-parallel styles (where torch.distributed exists)."""
    if not torch.distributed.is_available():
        return
    try:
        from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES, TensorParallelLayer
    except ImportError:  # a transformers without the DTensor tensor-parallel backend
        return

    class InfiniteVLHeadParallel(TensorParallelLayer):
        """Parameters split on dim 0 (heads, or channels of heads); the module's forward sees the local shards."""

        def should_use_local_tensors(self, module: nn.Module) -> bool:
            return True

        def shard_param(self, module: nn.Module, param: str, mesh) -> None:
            from torch.distributed.tensor import Shard, distribute_tensor

            meta = module._parameters.get(param)
            if meta is None:
                return
            module._parameters[param] = nn.Parameter(
                distribute_tensor(meta, mesh, [Shard(0)], src_data_rank=None), requires_grad=meta.requires_grad
            )

    if HEAD_STYLE not in ALL_PARALLEL_STYLES:
        ALL_PARALLEL_STYLES.register(HEAD_STYLE, InfiniteVLHeadParallel())


_register_head_style()
