"""How one attention layer's queries attend to what its cache holds: the one call `InfiniteVLAttention` makes.

- packed sequences (training, `cu_seqlens`): a block-diagonal window mask;
- one decode query over a ring (static cache): the ring decode op (`ops.decode_attention`: its split-key Triton
  kernel on CUDA);
- a long chunk (at least `LONG_CHUNK_TOKENS`, sdpa, inference, CUDA) over a full window of cached keys in token
  order: cuDNN's fused attention on three pieces of the band (`ops.window_attention`) or flex_attention's block
  mask (`ops.window_attention.flex`), which skip the keys outside the window;
- otherwise a dense mask through transformers' attention interface (sdpa, eager, ...).

The cache layer says what it handed over (`cache.AttentionKeys`): the keys' order, flags and past length.
"""

from __future__ import annotations

import contextlib

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import eager_attention_forward

from .cache import AttentionKeys
from .ops.decode_attention import decode_attention
from .ops.dispatch import reference_forced
from .ops.window_attention import cudnn_window_attention_usable, window_attention
from .ops.window_attention.flex import flex_attention_usable, window_flex_attention

# Chunks at least this long, over a full window of cached keys, skip the keys outside their window on CUDA
# (`long_chunk_path`). Shorter ones keep the dense mask: little to skip, and flex_attention would compile a
# kernel for each new length.
LONG_CHUNK_TOKENS = 1024


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


def long_chunk_path(query: torch.Tensor, implementation: str, window: int | None, training: bool,
                    token_valid: torch.Tensor | None) -> str | None:
    """How a chunk of queries over a full window of cached keys skips the keys outside its window on CUDA:
    "pieces" (cuDNN's fused attention on the band's three pieces: it runs at twice flex_attention's rate on
    Hopper), "flex" (a block mask; also takes padding in the chunk), or None (the dense mask, the reference: short
    chunks, training, other backends, CPU, no window, or the torch reference forced)."""
    length = query.shape[2]
    if window is None or length < LONG_CHUNK_TOKENS or implementation != "sdpa" or training:
        return None
    if reference_forced() is not None:
        return None
    if token_valid is None and length <= window and cudnn_window_attention_usable(query):
        return "pieces"
    return "flex" if flex_attention_usable(query) else None


def update_cache(module, cache, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, implementation: str,
                 token_valid: torch.Tensor | None = None, cu_seqlens: torch.LongTensor | None = None,
                 ) -> tuple[AttentionKeys, str | None]:
    """The layer's keys/values after its cache update (as they are without a cache), and `long_chunk_path`'s
    answer for the chunk: a long chunk's kernel asks a ring for its keys in token order."""
    path = long_chunk_path(query, implementation, module.window, module.training, token_valid)
    if cache is None:
        return AttentionKeys(key, value, 0), path
    if cu_seqlens is not None:
        raise ValueError("Packed sequences (cu_seqlens) are for training and cannot use a cache.")
    return cache.attention_keys(module.layer_idx, key, value, valid=token_valid, token_order=path is not None), path


def attend(
    module,
    query: torch.Tensor,
    seen: AttentionKeys,
    path: str | None,
    implementation: str,
    token_valid: torch.Tensor | None = None,
    cu_seqlens: torch.LongTensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """query [B, H, T, D] over `seen` -> (output [B, T, H, D], attention weights where the function gives them).

    `path` is `long_chunk_path`'s answer for this chunk (it asked the cache for the keys' order)."""
    batch, _, length, _ = query.shape
    window, scaling = module.window, module.scaling
    if cu_seqlens is not None:  # packed sequences: positions already restart per sequence
        mask = packed_window_mask(cu_seqlens, length, window, implementation, query.dtype, query.device)
    elif not seen.in_token_order:  # a ring in slot order (static decode): no host syncs
        if length == 1 and not module.training:
            return decode_attention(query, seen.keys, seen.values, seen.past_valid, scaling), None
        visible = seen.visible if seen.visible is not None else seen.past_valid[:, None, None, :]
        mask = mask_for(visible, implementation, query.dtype)
    elif path is not None and (
        seen.key_valid is not None  # a ring read in token order for this chunk
        or (seen.past_length == window - 1 and seen.past_valid is None and token_valid is None)
    ):
        # A long chunk over a full window: skipping the keys outside it halves the work (over a ring, empty or
        # padded slots are masked by their flags; once the ring holds only tokens the pieces need no mask).
        if path == "pieces":
            return window_attention(query, seen.keys, seen.values, window, scaling, past_valid=seen.past_valid), None
        output = window_flex_attention(query, seen.keys, seen.values, seen.past_length, window, scaling,
                                       key_valid=seen.key_valid)
        return output, None
    else:
        mask = window_attention_mask(seen.past_valid, token_valid, batch, length, seen.past_length, window,
                                     implementation, query.dtype, query.device)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
    # One decode query over a growing cache: cuDNN's sdpa would build a new plan for every key length.
    backends = _decode_sdpa_backends() if length == 1 and query.is_cuda and implementation == "sdpa" else None
    with backends if backends is not None else contextlib.nullcontext():
        return attention(
            module,
            query,
            seen.keys,
            seen.values,
            mask,
            dropout=0.0 if not module.training else module.attention_dropout,
            scaling=scaling,
            sliding_window=window,
            **kwargs,
        )


def _decode_sdpa_backends():
    """sdpa's kernels that take any key length without per-length setup (flash, memory-efficient, math)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
