"""Sliding-window attention of a long chunk over the window cached before it: cuDNN's fused attention in
three pieces merged by log-sum-exp on CUDA (`pieces.py`); the torch definition of a piece elsewhere (tests)."""

from __future__ import annotations

import torch

from .cudnn import cudnn_attention_usable, cudnn_piece_attention
from .pieces import merge_pieces, window_attention_by_pieces
from .reference import piece_attention_reference


def cudnn_window_attention_usable(query: torch.Tensor) -> bool:
    """Inference on a GPU where cuDNN's fused attention runs, in half precision."""
    return (query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and not torch.is_grad_enabled()
            and cudnn_attention_usable(query.device))


def window_attention(query, key, value, window: int, scale: float, past_valid=None) -> torch.Tensor:
    """See `pieces.window_attention_by_pieces`: cuDNN pieces where usable, the float32 reference otherwise."""
    piece = cudnn_piece_attention if cudnn_window_attention_usable(query) else piece_attention_reference
    return window_attention_by_pieces(query, key, value, window, scale, piece, past_valid)


__all__ = ["cudnn_window_attention_usable", "merge_pieces", "piece_attention_reference", "window_attention",
           "window_attention_by_pieces"]
