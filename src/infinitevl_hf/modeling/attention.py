"""Sliding-window (and full) attention layers of the decoder, with their mRoPE and masks.

The layers are Qwen2.5-VL's text attention (16 query heads, 2 key/value heads, q/k/v bias) run
through transformers' attention interface (`sdpa` by default and `eager` are tested; other backends get
the same dense masks but are not verified: the vision tower refuses flex_attention, and torch's CPU
flex kernel crashed on these masks). Only the window differs: a token sees itself and the
`window - 1` tokens before it. The cache keeps just those tokens, so the mask of a call is built
from what the cache holds, not from the whole history.

The layer reads: project, rotary, cache update, one attention call, o_proj. Which kernel the call takes (a dense
mask, the ring decode op, cuDNN pieces or flex_attention for a long chunk, the packed-sequence mask) is
`attention_paths.attend`'s choice, from what the cache update returned.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .attention_paths import attend, update_cache
from .joined_linear import apply_linear, project
from .ops.elementwise import apply_rotary
from .configuration_infinitevl import ROPE_TYPES, InfiniteVLTextConfig


class InfiniteVLRotaryEmbedding(nn.Module):
    """mRoPE: each of the (time, height, width) position axes rotates its own section of the head dims.

    `rope_parameters["rope_type"]` may be "default", "linear" or "yarn" (`ROPE_TYPES`): the frequencies (and
    yarn's attention factor on cos/sin) come from transformers' rope functions; other types are refused by the
    config (`InfiniteVLTextConfig.validate_infinitevl`)."""

    def __init__(self, config: InfiniteVLTextConfig):
        super().__init__()
        rope = config.rope_parameters or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"InfiniteVL's mRoPE supports rope_type {ROPE_TYPES}, got {rope_type!r}.")
        head_dim = config.hidden_size // config.num_attention_heads
        self.mrope_section = list(rope.get("mrope_section", [16, 24, 24]))
        self.attention_scaling = 1.0
        if rope_type == "default":
            theta = rope.get("rope_theta", 1000000.0)
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        else:
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [3, B, T] -> (cos, sin), each [B, T, head_dim] in x's dtype."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device, torch.float32)  # [3, B, T, D/2]
        sections = freqs.split(self.mrope_section, dim=-1)
        freqs = torch.cat([part[i % 3] for i, part in enumerate(sections)], dim=-1)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


class InfiniteVLAttention(nn.Module):
    """Qwen2.5-VL text attention over a window of `config.sliding_window` tokens (`sliding_attention`),
    or over everything (`full_attention`)."""

    def __init__(self, config: InfiniteVLTextConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout or 0.0
        self.is_causal = True
        self.window = config.window_for_layer(layer_idx)
        self.sliding_window = self.window  # the name attention backends read
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        token_valid: torch.Tensor | None = None,
        cache=None,
        input_norm: nn.Module | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states [B, T, hidden]; token_valid [B, T] bool (False on padding) or None. input_norm: the decoder
        layer's pre-norm, not yet applied to hidden_states: applied here, inside the joined q/k/v product at decode
        where it runs as defined (`joined_linear.project`).

        Returns the output [B, T, hidden] and the attention weights [B, H, T, keys] where the attention function
        gives them (eager; the keys are the cached window followed by the new tokens), else None."""
        batch, length, _ = hidden_states.shape
        shape = (batch, length, -1, self.head_dim)
        projections = project(hidden_states, (self.q_proj, self.k_proj, self.v_proj), input_norm)  # one at decode
        query, key, value = (t.view(shape).transpose(1, 2) for t in projections)
        query, key = apply_rotary(query, key, *position_embeddings)

        implementation = self.config._attn_implementation or "sdpa"
        cu_seqlens = kwargs.pop("cu_seqlens", None)
        seen, path = update_cache(self, cache, query, key, value, implementation, token_valid, cu_seqlens)
        output, weights = attend(self, query, seen, path, implementation, token_valid, cu_seqlens, **kwargs)
        return apply_linear(output.reshape(batch, length, -1).contiguous(), self.o_proj), weights
