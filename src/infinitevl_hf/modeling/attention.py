"""Sliding-window (and full) attention layers of the decoder, with their mRoPE and masks.

The layers are Qwen2.5-VL's text attention (16 query heads, 2 key/value heads, q/k/v bias) run
through transformers' attention interface (`sdpa` by default and `eager` are tested; other backends get
the same dense masks but are not verified: the vision tower refuses flex_attention, and torch's CPU
flex kernel crashed on these masks). Only the window differs: a token sees itself and the
`window - 1` tokens before it. The cache keeps just those tokens, so the mask of a call is built
from what the cache holds, not from the whole history.

With `sdpa` on CUDA, a long prefill chunk over a full window of cached keys skips the keys outside its window
instead of computing and masking them: cuDNN's fused attention on three pieces of the band, merged by their
log-sum-exp (`ops.window_attention`), or a compiled flex_attention with a sliding-window block mask
(`window_flex_attention`) where cuDNN's cannot run or the chunk has padding.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import eager_attention_forward

from .cache import InfiniteVLRingAttentionLayer
from .compiled import compiled_for_inference
from .ops.decode_attention import ring_decode_attention
from .ops.window_attention import cudnn_window_attention_usable, window_attention
from .configuration_infinitevl import InfiniteVLTextConfig


class InfiniteVLRotaryEmbedding(nn.Module):
    """mRoPE: each of the (time, height, width) position axes rotates its own section of the head dims."""

    def __init__(self, config: InfiniteVLTextConfig):
        super().__init__()
        rope = config.rope_parameters or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"InfiniteVL supports only the default mRoPE, got rope_type={rope.get('rope_type')!r}.")
        head_dim = config.hidden_size // config.num_attention_heads
        theta = rope.get("rope_theta", 1000000.0)
        self.mrope_section = list(rope.get("mrope_section", [16, 24, 24]))
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [3, B, T] -> (cos, sin), each [B, T, head_dim] in x's dtype."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device, torch.float32)  # [3, B, T, D/2]
        sections = freqs.split(self.mrope_section, dim=-1)
        freqs = torch.cat([part[i % 3] for i, part in enumerate(sections)], dim=-1)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q, k [B, H, T, D]; cos, sin [B, T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


_apply_rotary = compiled_for_inference(apply_rotary)  # one kernel for q and k on CUDA


def mask_for(visible: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """A bool visibility mask in the form the attention function takes: bool for sdpa, additive float otherwise."""
    if implementation == "sdpa":
        return visible
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, torch.finfo(dtype).min)


def window_attention_mask(
    past_valid: torch.Tensor | None,
    new_valid: torch.Tensor | None,
    batch: int,
    query_length: int,
    past_length: int,
    window: int | None,
    implementation: str,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """Mask of `query_length` new queries over `past_length` cached keys followed by the new keys.

    Key j is visible to query i when it is not in the future, lies within the window, and is not
    padding. Every query sees itself, so padding queries stay finite. Returns None where the
    attention function's own causal path gives the same result, a bool mask [B, 1, Q, P+Q] for
    sdpa, and an additive float mask otherwise.
    """
    has_padding = past_valid is not None or new_valid is not None  # None means "no padding" (no host sync)
    in_window = window is None or past_length + query_length <= window
    if not has_padding and in_window and (query_length == 1 or (past_length == 0 and implementation == "sdpa")):
        return None
    q_pos = torch.arange(query_length, device=device)[:, None] + past_length
    k_pos = torch.arange(past_length + query_length, device=device)[None, :]
    visible = k_pos <= q_pos
    if window is not None:
        visible &= k_pos > q_pos - window
    visible = visible[None, None].expand(batch, 1, -1, -1)
    if has_padding:
        keys_valid = torch.cat(
            [
                past_valid if past_valid is not None else torch.ones(batch, past_length, dtype=torch.bool, device=device),
                new_valid if new_valid is not None else torch.ones(batch, query_length, dtype=torch.bool, device=device),
            ],
            dim=-1,
        )
        visible = (visible & keys_valid[:, None, None, :]) | (k_pos == q_pos)[None, None]
    return mask_for(visible, implementation, dtype)


def packed_window_mask(
    cu_seqlens: torch.LongTensor, length: int, window: int | None, implementation: str, dtype: torch.dtype, device
) -> torch.Tensor:
    """Block-diagonal causal window mask [1, 1, T, T] of sequences packed in one row at boundaries `cu_seqlens`:
    a token sees the tokens of its own sequence that are not in the future and lie within the window."""
    segment = torch.bucketize(torch.arange(length, device=device), cu_seqlens.to(device)[1:], right=True)
    pos = torch.arange(length, device=device)
    visible = (pos[None, :] <= pos[:, None]) & (segment[None, :] == segment[:, None])
    if window is not None:
        visible &= pos[None, :] > pos[:, None] - window
    visible = visible[None, None]
    return mask_for(visible, implementation, dtype)


# Chunks at least this long, over a full window of cached keys, skip the keys outside their window on CUDA
# (`InfiniteVLAttention._long_chunk_path`). Shorter ones keep the dense mask: little to skip, and flex_attention
# would compile a kernel for each new length.
LONG_CHUNK_TOKENS = 1024


@functools.lru_cache(maxsize=2)
def _flex_attention(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    # flex_attention is fast only compiled; uncompiled it is a slow reference (used on CPU by tests). Default
    # dynamism: a second chunk length (a prompt's last chunk) recompiles once with dynamic shapes, not per length.
    return torch.compile(flex_attention) if compiled else flex_attention


@functools.lru_cache(maxsize=16)
def _window_block_mask(past_length: int, length: int, window: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def visible(batch, head, q_idx, kv_idx):
        offset = kv_idx - past_length  # key position relative to the first query
        return (offset <= q_idx) & (offset > q_idx - window)

    return create_block_mask(visible, None, None, length, past_length + length, device=device)


def window_flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_length: int,
    window: int,
    scaling: float,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """A chunk of `T` queries over `past_length` cached keys followed by its own keys, through a sliding window,
    with flex_attention: its block mask skips the blocks outside the window that a dense-mask kernel computes
    and throws away (for a chunk of one window that is half the work).

    query [B, H, T, D]; key/value [B, H_kv, past_length + T, D], oldest first; key_valid [B, past_length + T]
    bool (False: padding or an empty slot, which no query sees but its own) or None (all valid).
    Returns [B, T, H, D].
    """
    mask = _window_block_mask(past_length, query.shape[2], window, str(query.device))
    score_mod = None
    if key_valid is not None:
        # a score_mod rather than the block mask: the mask stays static (built once per shape), the flags are data

        def score_mod(score, batch, head, q_idx, kv_idx):
            keep = key_valid[batch, kv_idx] | (kv_idx == q_idx + past_length)
            return torch.where(keep, score, -float("inf"))

    out = _flex_attention(query.is_cuda)(query, key, value, score_mod=score_mod, block_mask=mask, scale=scaling,
                                         enable_gqa=True)
    return out.transpose(1, 2)


def flex_attention_usable(query: torch.Tensor) -> bool:
    """Compiled flex_attention needs CUDA and Triton; anything else keeps the dense-mask path."""
    return query.is_cuda and _flex_importable()


@functools.lru_cache(maxsize=1)
def _flex_importable() -> bool:  # asked per layer and chunk: import once
    try:
        import triton  # noqa: F401
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


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

    def _long_chunk_path(self, query: torch.Tensor, implementation: str, token_valid: torch.Tensor | None) -> str | None:
        """How a chunk of queries over a full window of cached keys skips the keys outside its window on CUDA:
        "pieces" (cuDNN's fused attention on the band's three pieces: it runs at twice flex_attention's rate on
        Hopper), "flex" (a block mask; also takes padding in the chunk), or None (the dense mask: short chunks,
        training, other backends, CPU)."""
        length = query.shape[2]
        if length < LONG_CHUNK_TOKENS or implementation != "sdpa" or self.training:
            return None
        if token_valid is None and length <= self.window and cudnn_window_attention_usable(query):
            return "pieces"
        return "flex" if flex_attention_usable(query) else None

    def _attend_past_window(self, path: str, query, key, value, key_valid, past_valid) -> torch.Tensor:
        """The output projection of a chunk's attention over the `window - 1` cached keys before it and its own
        (key/value in token order), by `_long_chunk_path`'s `path`. key_valid [B, window - 1 + T] / past_valid
        [B, window - 1]: the flags flex / the pieces mask with (None: all valid)."""
        if path == "pieces":
            output = window_attention(query, key, value, self.window, self.scaling, past_valid=past_valid)
        else:
            output = window_flex_attention(query, key, value, self.window - 1, self.window, self.scaling,
                                           key_valid=key_valid)
        batch, _, length, _ = query.shape
        return self.o_proj(output.reshape(batch, length, -1).contiguous())

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        token_valid: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ) -> torch.Tensor:
        """hidden_states [B, T, hidden]; token_valid [B, T] bool (False on padding) or None."""
        batch, length, _ = hidden_states.shape
        shape = (batch, length, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        query, key = _apply_rotary(query, key, *position_embeddings)

        implementation = self.config._attn_implementation or "sdpa"
        layer_cache = cache.layers[self.layer_idx] if cache is not None else None
        cu_seqlens = kwargs.pop("cu_seqlens", None)
        if cu_seqlens is not None:
            # Packed sequences (training): block-diagonal window; positions already restart per sequence.
            if layer_cache is not None:
                raise ValueError("Packed sequences (cu_seqlens) are for training and cannot use a cache.")
            mask = packed_window_mask(cu_seqlens, length, self.window, implementation, query.dtype, query.device)
        elif isinstance(layer_cache, InfiniteVLRingAttentionLayer):
            # Static decode: the ring holds exactly the window (this token included); no host syncs.
            path = self._long_chunk_path(query, implementation, token_valid)
            if path is not None:
                # A long chunk (frames of a stream): over the ring in token order the chunk's mask is the plain
                # window, which skips the keys a dense mask over ring + chunk computes and throws away (a third of
                # them for 4K tokens). Empty or padded slots are masked by their flags.
                key, value, key_valid = layer_cache.update_in_order(key, value, valid=token_valid)
                # once the ring holds only tokens (known on the host), the pieces need no mask: 40% faster
                past_valid = None if cache.window_is_full(self.window) else key_valid[:, : self.window - 1]
                return self._attend_past_window(path, query, key, value, key_valid, past_valid)
            key, value = layer_cache.update(key, value, valid=token_valid)
            if length == 1 and not self.training:
                output = ring_decode_attention(query, key, value, layer_cache.valid, self.scaling)
                return self.o_proj(output.reshape(batch, length, -1))
            mask = mask_for(layer_cache.chunk_mask, implementation, query.dtype)
        else:
            past_valid, past_length = None, 0
            if layer_cache is not None:
                past_valid, past_length = layer_cache.valid, layer_cache.past_length()
                key, value = layer_cache.update(key, value, valid=token_valid)
            path = None
            if self.window is not None and past_length == self.window - 1 and past_valid is None and token_valid is None:
                path = self._long_chunk_path(query, implementation, None)
            if path is not None:
                # A long prefill chunk after the first: skipping the keys outside the window halves the work.
                return self._attend_past_window(path, query, key, value, None, None)
            mask = window_attention_mask(
                past_valid, token_valid, batch, length, past_length, self.window, implementation,
                query.dtype, query.device,
            )
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        # One decode query over a growing cache: cuDNN's sdpa would build a new plan for every key length.
        backends = _decode_sdpa_backends() if length == 1 and query.is_cuda and implementation == "sdpa" else None
        with backends if backends is not None else contextlib.nullcontext():
            output, _ = attention(
                self,
                query,
                key,
                value,
                mask,
                dropout=0.0 if not self.training else self.attention_dropout,
                scaling=self.scaling,
                sliding_window=self.window,
                **kwargs,
            )
        return self.o_proj(output.reshape(batch, length, -1).contiguous())


def _decode_sdpa_backends():
    """sdpa's kernels that take any key length without per-length setup (flash, memory-efficient, math)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
