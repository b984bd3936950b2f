"""InfiniteVL's `sliding_attention` (and `full_attention`) layers on vLLM's paged attention.

vLLM's stock Qwen2 attention takes one model-wide window; InfiniteVL windows only some layers, so this layer
passes its own window to vLLM's `Attention` (`per_layer_sliding_window`), which then keeps a sliding-window
KV cache for it. mRoPE comes from vLLM's `get_rope` (the config's `mrope_section`).
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.distributed import get_tensor_model_parallel_world_size


class InfiniteVLAttention(nn.Module):
    """Qwen2.5-VL's text attention (q/k/v bias, GQA, mRoPE), windowed per `config.window_for_layer`."""

    def __init__(self, text_config, layer_idx: int, cache_config=None, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        self.head_dim = text_config.hidden_size // text_config.num_attention_heads
        self.num_heads = text_config.num_attention_heads // tp_size
        self.num_kv_heads = max(1, text_config.num_key_value_heads // tp_size)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(
            text_config.hidden_size,
            self.head_dim,
            text_config.num_attention_heads,
            text_config.num_key_value_heads,
            bias=True,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            text_config.num_attention_heads * self.head_dim,
            text_config.hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=text_config.max_position_embeddings,
            rope_parameters=text_config.rope_parameters,
        )
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            per_layer_sliding_window=text_config.window_for_layer(layer_idx),
            prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        output, _ = self.o_proj(self.attn(q, k, v))
        return output
