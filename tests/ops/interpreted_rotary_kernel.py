"""Run by test_rotary_kernel.py in a subprocess with TRITON_INTERPRET=1 (set before Triton is imported): the
vision rotary kernel under Triton's CPU interpreter against transformers' function. Exits non-zero on a
mismatch, printing every comparison."""

import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from infinitevl_hf.modeling.ops.rotary.reference import vision_rotary_qk_reference  # noqa: E402
from infinitevl_hf.modeling.ops.rotary.triton_rotary import triton_vision_rotary_qk  # noqa: E402

failures = []
# heads not a power of two, a token count that leaves the last block partial, rows with a gap after them
for dtype, heads, dim, tokens in ((torch.float32, 3, 20, 11), (torch.bfloat16, 3, 20, 11), (torch.float32, 16, 80, 9)):
    torch.manual_seed(heads)
    qkv = torch.randn(tokens, 3 * heads * dim + 8, dtype=dtype)[:, : 3 * heads * dim]
    freqs = torch.randn(tokens, dim // 2) * 5
    angles = torch.cat([freqs, 0.7 * freqs], dim=-1)  # halves differ: each half must read its own angles
    cos, sin = angles.cos(), angles.sin()
    query, key = triton_vision_rotary_qk(qkv, heads, cos, sin, block_tokens=4)
    expected = vision_rotary_qk_reference(qkv, heads, cos, sin)
    for name, got, ref in (("query", query, expected[0]), ("key", key, expected[1])):
        # float32: the same operations; bfloat16: the interpreter rounds float32 -> bfloat16 differently from
        # the GPU (not to nearest even), one unit in the last place at most
        ulp = 0.0 if dtype == torch.float32 else 2.0**-7
        worst = ((got.float() - ref.float()).abs() / ref.float().abs().clamp_min(1.0)).max().item()
        ok = got.shape == ref.shape and got.is_contiguous() and worst <= ulp + 1e-6
        print(f"{'ok  ' if ok else 'FAIL'} {name} {str(dtype):15s} heads={heads} dim={dim} worst {worst:.2e}")
        if not ok:
            failures.append(name)
sys.exit(1 if failures else 0)
