"""A chunk's sliding-window attention over the keys cached before it with flex_attention: its block mask skips
the blocks outside the window that a dense-mask kernel computes and throws away (for a chunk of one window that
is half the work). Takes padding or empty slots in the keys (a score_mod on their flags)."""

from __future__ import annotations

import functools

import torch

from ..dispatch import triton_available


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
    """A chunk of `T` queries over `past_length` cached keys followed by its own keys, through a sliding window.

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


@functools.lru_cache(maxsize=1)
def _flex_importable() -> bool:  # asked per layer and chunk: import once
    if not triton_available():
        return False
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def flex_attention_usable(query: torch.Tensor) -> bool:
    """Compiled flex_attention needs CUDA and Triton; anything else keeps the dense-mask path."""
    return query.is_cuda and _flex_importable()
