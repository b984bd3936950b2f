"""Sliding-window attention of a long chunk over the window cached before it: cuDNN's fused attention in
three pieces merged by log-sum-exp on CUDA (`pieces.py`); the torch definition of a piece elsewhere (tests).
`dispatch.py` chooses the piece; `flex.py` holds the flex_attention alternative."""

from __future__ import annotations

import torch

from ..dispatch import register_op
from .cudnn import cudnn_attention_usable, cudnn_piece_attention
from .pieces import merge_pieces, window_attention_by_pieces
from .reference import piece_attention_reference


def _cudnn_problem(query: torch.Tensor, *args) -> str | None:
    """Why cuDNN's fused attention cannot run a piece: it serves inference on a GPU, in half precision."""
    if not query.is_cuda:
        return "inputs are not on CUDA"
    if query.dtype not in (torch.bfloat16, torch.float16):
        return f"cuDNN's attention takes bf16/fp16, got {query.dtype}"
    if torch.is_grad_enabled():
        return "autograd is on"
    if not cudnn_attention_usable(query.device):
        return "cuDNN 9 on an Ampere-or-newer GPU with cuDNN sdpa enabled is needed"
    return None


_piece_attention = register_op("piece_attention", piece_attention_reference)
_piece_attention.register("cudnn", cudnn_piece_attention, _cudnn_problem)


def cudnn_window_attention_usable(query: torch.Tensor) -> bool:
    """Inference on a GPU where cuDNN's fused attention runs, in half precision."""
    return _cudnn_problem(query) is None


def window_attention(query, key, value, window: int, scale: float, past_valid=None) -> torch.Tensor:
    """See `pieces.window_attention_by_pieces`: cuDNN pieces where usable, the float32 reference otherwise."""
    piece = _piece_attention.select(query).fn
    return window_attention_by_pieces(query, key, value, window, scale, piece, past_valid)


__all__ = ["cudnn_window_attention_usable", "merge_pieces", "piece_attention_reference", "window_attention",
           "window_attention_by_pieces"]
