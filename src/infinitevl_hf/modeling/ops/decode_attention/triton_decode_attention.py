"""One decode query over a ring of cached keys in two Triton kernels, split along the keys.

A single query has one row per head: the batched matmuls of the torch path run as a handful of GEMM tiles
over an 8K-key window (far from the bandwidth of 4 MB of keys: benchmarks/README.md, "Measurements behind the
code") plus a softmax launch.
Here the ring is cut into blocks of keys; one program per (block, batch row, key/value head) scores its
keys for all the query heads that share them (GQA: the heads are the rows of one small `tl.dot`), keeps a
running max and sum (online softmax) and writes its partial output; a second kernel merges the blocks
of each head. Slots not yet written (`valid` False) are masked out, and a block with none written is skipped.
Scores stay float32 from the dot (the torch path rounds them to the activation dtype first), so results agree
to bf16 rounding.
"""

from __future__ import annotations

import os

import torch

try:  # (transformers' remote-code import check skips try blocks: Triton stays optional)
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("the Triton decode attention kernel needs Triton") from error

from ..triton_launch import cdiv, launch, next_power_of_2

# Triton's CPU interpreter (used by the tests) computes a bfloat16 `tl.dot` wrongly: there the operands
# are upcast to float32 first; compiled kernels keep the activation dtype.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _partial_kernel(
    Q, Kc, Vc, VALID, M, L, ACC, scale, slots,
    stride_qb, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_valid,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_S: tl.constexpr, DOT_F32: tl.constexpr,
):
    split, row_head = tl.program_id(0), tl.program_id(1)
    row, kv_head = row_head // KV_HEADS, row_head % KV_HEADS
    group, dims = tl.arange(0, GROUP_PAD), tl.arange(0, D)
    heads = kv_head * GROUP + group
    q = tl.load(Q + row * stride_qb + heads[:, None] * D + dims[None, :], mask=(group < GROUP)[:, None], other=0.0)
    dot_dtype = tl.float32 if DOT_F32 else q.dtype
    q = q.to(dot_dtype)
    m = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, D], dtype=tl.float32)
    for offset in range(0, SPLIT, BLOCK_S):
        keys = split * SPLIT + offset + tl.arange(0, BLOCK_S)
        ok = (keys < slots) & (tl.load(VALID + row * stride_valid + keys, mask=keys < slots, other=0) != 0)
        if tl.max(ok.to(tl.int32), axis=0) > 0:  # a block of unwritten slots (most of a young ring) adds nothing
            k = tl.load(Kc + row * stride_kb + kv_head * stride_kh + keys[:, None] * stride_ks + dims[None, :],
                        mask=ok[:, None], other=0.0)
            # (cast: torch.compile may pass `scale` as a float64 constant, which would promote the running max)
            scores = (tl.dot(q, tl.trans(k.to(dot_dtype))) * scale).to(tl.float32)  # [GROUP_PAD, BLOCK_S]
            scores = tl.where(ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing valid yet: keep exp() finite
            p = tl.exp(scores - m_safe[:, None])
            alpha = tl.exp(m - m_safe)
            v = tl.load(Vc + row * stride_vb + kv_head * stride_vh + keys[:, None] * stride_vs + dims[None, :],
                        mask=ok[:, None], other=0.0)
            l = l * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(dot_dtype), v.to(dot_dtype))
            m = m_new
    splits = tl.num_programs(0)
    out = (row_head * splits + split) * GROUP_PAD + group
    tl.store(M + out, m)
    tl.store(L + out, l)
    tl.store(ACC + out[:, None] * D + dims[None, :], acc)


@triton.jit
def _merge_kernel(M, L, ACC, O, splits, KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                  D: tl.constexpr, SPLITS_PAD: tl.constexpr):
    row_head_q = tl.program_id(0)  # (batch row, query head)
    heads = KV_HEADS * GROUP
    row, head = row_head_q // heads, row_head_q % heads
    kv_head, g = head // GROUP, head % GROUP
    parts, dims = tl.arange(0, SPLITS_PAD), tl.arange(0, D)
    index = ((row * KV_HEADS + kv_head) * splits + parts) * GROUP_PAD + g
    m = tl.load(M + index, mask=parts < splits, other=float("-inf"))
    l = tl.load(L + index, mask=parts < splits, other=0.0)
    m_max = tl.max(m, axis=0)
    weight = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))
    acc = tl.load(ACC + index[:, None] * D + dims[None, :], mask=(parts < splits)[:, None], other=0.0)
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(l * weight, axis=0)
    tl.store(O + row_head_q * D + dims, out.to(O.dtype.element_ty))


def triton_ring_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor,
                                 scaling: float, split: int = 128, block_s: int = 64) -> torch.Tensor:
    """`ring_decode_attention` (same arguments and [B, 1, H, D] result) as a split-keys kernel and a merge.
    query [B, H, 1, D] contiguous; key/value [B, H_kv, S, D] with unit stride along D; valid [B, S]. (Fewer,
    longer splits for a batch were slower: benchmarks/README.md, session 16.)"""
    batch, heads, _, dim = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    group = heads // kv_heads
    group_pad = max(16, next_power_of_2(group))  # tl.dot needs 16 rows
    splits = cdiv(slots, split)
    partial = dict(device=query.device, dtype=torch.float32)
    m = torch.empty(batch * kv_heads * splits * group_pad, **partial)
    l = torch.empty_like(m)
    acc = torch.empty(batch * kv_heads * splits * group_pad, dim, **partial)
    launch(_partial_kernel, (splits, batch * kv_heads),
        query, key, value, valid, m, l, acc, scaling, slots,
        query.stride(0), *key.stride()[:3], *value.stride()[:3], valid.stride(0),
        KV_HEADS=kv_heads, GROUP=group, GROUP_PAD=group_pad, D=dim, SPLIT=split, BLOCK_S=block_s,
        DOT_F32=_INTERPRETED, num_warps=4,
    )
    out = torch.empty(batch, 1, heads, dim, device=query.device, dtype=query.dtype)
    launch(_merge_kernel, (batch * heads,),
        m, l, acc, out, splits, KV_HEADS=kv_heads, GROUP=group, GROUP_PAD=group_pad, D=dim,
        SPLITS_PAD=next_power_of_2(splits), num_warps=4,
    )
    return out
