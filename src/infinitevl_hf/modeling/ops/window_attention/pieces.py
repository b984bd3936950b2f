"""A chunk's sliding-window attention as three plain attention calls merged by their log-sum-exp.

The chunk's T queries see, in token order, the `window - 1` keys cached before the chunk and then the chunk's
own keys: query t sees key j (0-based over both) for t <= j <= window - 1 + t, a band. Library attention
kernels skip work only for a causal triangle, so the band is cut into pieces each of them runs at full speed:

- A: the oldest min(T, window - 1) cached keys. Query t sees those from key t on: an anti-causal triangle,
  which is causal with queries and keys reversed.
- B: the cached keys after those (only when T < window - 1): every query sees all of them, no mask.
- C: the chunk's own keys: causal.

Each piece returns its output and log-sum-exp; softmax over the union is their lse-weighted mean, so the
result is the band's attention up to the rounding of the pieces' outputs. A per-key bias (0 or -inf) on the
cached keys masks slots that hold no token (a stream's first calls) or padding.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..dispatch import cuda_inference_op

PieceFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def merge_pieces(*pieces: torch.Tensor) -> torch.Tensor:
    """(output [B, H, T, D], lse [B, H, T, 1]) pairs, flattened, -> their joint softmax output [B, T, H, D]. A
    piece a query sees nothing of has lse -inf and weight 0; every query sees its own key (piece C)."""
    outputs, lses = pieces[0::2], pieces[1::2]
    top = lses[0]
    for lse in lses[1:]:
        top = torch.maximum(top, lse)
    total, merged = 0.0, 0.0
    for output, lse in zip(outputs, lses):
        weight = torch.exp(lse - top)
        total = total + weight
        merged = merged + weight * output.to(weight.dtype)
    return (merged / total).to(outputs[0].dtype).transpose(1, 2)


def torch_merge_pieces_reversed_first(output: torch.Tensor, lse: torch.Tensor, *pieces: torch.Tensor) -> torch.Tensor:
    """`merge_pieces` with the first piece as the anti-causal piece comes out of its kernel: in reversed query
    order and covering only the first n <= T queries. Compiled, the flip and the padding become indexing in the
    merge's loads instead of four copies of the piece."""
    rows = pieces[0].shape[2] - output.shape[2]
    output = F.pad(output.flip(2), (0, 0, 0, rows))
    lse = F.pad(lse.flip(2), (0, 0, 0, rows), value=float("-inf"))  # queries that see none of these keys
    return merge_pieces(output, lse, *pieces)


merge_pieces_reversed_first = cuda_inference_op(torch_merge_pieces_reversed_first, "merge_pieces_reversed_first")


def window_attention_by_pieces(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    window: int,
    scale: float,
    piece: PieceFn,
    past_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """query [B, H, T, D], T <= window; key/value [B, H_kv, window - 1 + T, D]: the window - 1 tokens before the
    chunk, oldest first, then the chunk; past_valid [B, window - 1] bool (False: no token there, or padding)
    or None. `piece` is `reference.piece_attention_reference` or a kernel with its signature.
    Returns [B, T, H, D]."""
    past, length = window - 1, query.shape[2]
    if window < 2:
        raise ValueError(f"a window of at least 2 tokens has cached keys to cut into pieces, got {window}")
    if length > window or key.shape[2] != past + length:
        raise ValueError(f"expected at most {window} queries over {past} cached keys and their own, "
                         f"got {length} queries and {key.shape[2]} keys")
    bias = None
    if past_valid is not None:
        bias = torch.zeros(past_valid.shape, dtype=torch.float32, device=query.device)
        bias = bias.masked_fill(~past_valid, float("-inf"))[:, None, None, :]
    # A, as it comes out of its kernel: reversed, over the first `oldest` queries (the later ones see none of
    # these keys); the merge flips and pads it.
    oldest = min(length, past)
    flip = lambda x: x[:, :, :oldest].flip(2)  # noqa: E731
    pieces = [*piece(flip(query), flip(key), flip(value), None if bias is None else bias[..., :oldest].flip(-1),
                     True, scale)]
    if oldest < past:
        pieces += piece(query, key[:, :, oldest:past], value[:, :, oldest:past],
                        None if bias is None else bias[..., oldest:], False, scale)
    pieces += piece(query, key[:, :, past:], value[:, :, past:], None, True, scale)
    return merge_pieces_reversed_first(*pieces)
