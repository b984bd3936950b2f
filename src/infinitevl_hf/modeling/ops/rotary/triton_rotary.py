"""The vision tower's rotary embedding as one Triton kernel that reads the query and key straight out of the
joined qkv product and writes them rotated, contiguous [tokens, heads, dim].

The head dim of Qwen2.5-VL's tower is 80, so each half is 40 elements: a compiled torch version flattens
(tokens, heads, dim) into one index and recomputes the rotate-half partner with divisions; it ran at a third
of the copy bandwidth. Here a program owns a block of tokens, all heads, and both halves of each head as two
[tokens, heads, half] tiles, so every load is a contiguous run of 40 elements and the partner is the other
tile. Math as `reference.py`: float32, rounded once. Imported only where Triton is installed.
"""

from __future__ import annotations

import torch

try:  # (transformers' remote-code import check skips try blocks: Triton stays optional)
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("the Triton rotary kernel needs Triton") from error

from ..triton_launch import cdiv, launch, next_power_of_2


@triton.jit
def _vision_rotary_kernel(
    QKV, COS, SIN, Q_OUT, K_OUT, tokens, qkv_stride, angle_stride,
    HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)[:, None, None]
    h = tl.arange(0, BLOCK_H)[None, :, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    mask = (t < tokens) & (h < HEADS) & (d < HALF)
    angle_mask = (t < tokens) & (d < HALF)
    angle = t * angle_stride + d
    cos1 = tl.load(COS + angle, mask=angle_mask, other=0.0).to(tl.float32)
    cos2 = tl.load(COS + angle + HALF, mask=angle_mask, other=0.0).to(tl.float32)
    sin1 = tl.load(SIN + angle, mask=angle_mask, other=0.0).to(tl.float32)
    sin2 = tl.load(SIN + angle + HALF, mask=angle_mask, other=0.0).to(tl.float32)
    inner = h * (2 * HALF) + d  # offset within one of q / k
    out = t * (HEADS * 2 * HALF) + inner
    for part in tl.static_range(2):  # 0: query, 1: key
        src = QKV + t * qkv_stride + part * (HEADS * 2 * HALF) + inner
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        dst = Q_OUT if part == 0 else K_OUT
        tl.store(dst + out, (x1 * cos1 - x2 * sin1).to(dst.dtype.element_ty), mask=mask)
        tl.store(dst + out + HALF, (x2 * cos2 + x1 * sin2).to(dst.dtype.element_ty), mask=mask)


def triton_vision_rotary_qk(qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor,
                            block_tokens: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """See `reference.vision_rotary_qk_reference`. qkv [tokens, 3 * heads * dim] with unit stride along its
    last dim; cos, sin [tokens, dim] with unit stride along theirs."""
    tokens, width = qkv.shape
    dim = width // (3 * heads)
    query = qkv.new_empty(tokens, heads, dim)
    key = qkv.new_empty(tokens, heads, dim)
    grid = (cdiv(tokens, block_tokens),)
    launch(_vision_rotary_kernel, grid,
        qkv, cos, sin, query, key, tokens, qkv.stride(0), cos.stride(0),
        HEADS=heads, HALF=dim // 2, BLOCK_T=block_tokens, BLOCK_H=next_power_of_2(heads),
        BLOCK_D=next_power_of_2(dim // 2), num_warps=4,
    )
    return query, key
