"""Side-by-side timings of candidate kernels for the elementwise work of a streamed 16-frame call (vision rotary,
residual add + RMSNorm, residual add folded into the product), each checked against the current version.

    python benchmarks/elementwise_variants.py

Sizes are those of a 16-frame call: vision 16,384 patches x 1,280 (16 heads of 80), decoder 4,128 tokens x 2,048.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton.testing
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

from infinitevl_hf.modeling.ops.dispatch import cuda_inference_op
from infinitevl_hf.modeling.ops.norms import torch_add_rms_norm as add_rms_norm
from infinitevl_hf.modeling.ops.norms import torch_rms_norm as rms_norm


def ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def report(rows: list[tuple[str, float, float, float]], floor_bytes: int) -> None:
    floor = floor_bytes / 4.2e12 * 1e3
    print(f"  {'variant':44s} {'ms':>8s} {'TB/s':>6s} {'x floor':>8s} {'rel err':>9s}")
    for name, t, err, moved in rows:
        print(f"  {name:44s} {t:8.4f} {moved / t / 1e9:6.2f} {t / floor:8.2f} {err:9.2e}")


def rotary_variants(tokens=16384, heads=16, dim=80):
    from infinitevl_hf.modeling.ops.rotary import vision_rotary_qk

    dev = torch.device("cuda")
    qkv = torch.randn(tokens, 3 * heads * dim, device=dev, dtype=torch.bfloat16)
    freqs = torch.randn(tokens, dim // 2, device=dev) * 10
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos(), emb.sin()

    def split():
        return qkv.reshape(tokens, 3, heads, dim).unbind(1)

    current = cuda_inference_op(apply_rotary_pos_emb_vision)
    static = torch.compile(apply_rotary_pos_emb_vision, dynamic=False)
    with torch.no_grad():
        q, k, _ = split()
        ref = apply_rotary_pos_emb_vision(q, k, cos, sin)
        moved = 4 * tokens * heads * dim * 2 + 2 * tokens * dim * 4
        rows = []
        for name, fn in (
            ("eager (transformers)", lambda: apply_rotary_pos_emb_vision(*split()[:2], cos, sin)),
            ("compiled, dims but last dynamic (current)", lambda: current(*split()[:2], cos, sin)),
            ("compiled, all static", lambda: static(*split()[:2], cos, sin)),
            ("triton, from the qkv product", lambda: vision_rotary_qk(qkv, heads, cos, sin)),
        ):
            out = fn()
            rows.append((name, ms(fn), max(rel(out[0], ref[0]), rel(out[1], ref[1])), moved))
        copy = torch.empty_like(qkv)
        rows.append(("copy of the qkv product (bandwidth)", ms(lambda: copy.copy_(qkv)), 0.0, 2 * qkv.numel() * 2))
    print(f"vision rotary, {tokens} patches, {heads} heads of {dim}")
    report(rows, moved)


def add_bias_rms_norm(partial, bias, weight, eps: float):
    hidden = partial + bias
    return hidden, rms_norm(hidden, weight, eps)


def norm_variants(tokens: int, width: int, inner: int, bias: bool):
    dev, dt = torch.device("cuda"), torch.bfloat16
    residual = torch.randn(tokens, width, device=dev, dtype=dt)
    act = torch.randn(tokens, inner, device=dev, dtype=dt)
    w = torch.randn(width, inner, device=dev, dtype=dt) / inner**0.5
    b = torch.randn(width, device=dev, dtype=dt) if bias else None
    norm_w = torch.randn(width, device=dev, dtype=dt)
    eps = 1e-6
    fused = cuda_inference_op(add_rms_norm)
    fused_bias = cuda_inference_op(add_bias_rms_norm)
    rms = cuda_inference_op(rms_norm)
    with torch.no_grad():
        ref_h = residual + F.linear(act, w, b)
        ref_n = rms_norm(ref_h, norm_w, eps)

        def current():
            h = residual + F.linear(act, w, b)
            return h, rms(h, norm_w, eps)

        def fused_add():
            return fused(residual, F.linear(act, w, b), norm_w, eps)

        scratch = residual.clone()

        def in_product():
            # the residual add done by the product's epilogue (beta = 1, in place), then bias + norm in one kernel
            scratch.copy_(residual)  # (only so every repeat starts from the same residual; timed separately)
            h = scratch.addmm_(act, w.t())
            return fused_bias(h, b, norm_w, eps) if bias else (h, rms(h, norm_w, eps))

        rows = []
        for name, fn in (("linear, add, norm (current)", current), ("linear, add+norm fused", fused_add),
                         ("addmm_ in place, (bias+)norm", in_product)):
            h, n = fn()
            rows.append((name, ms(fn), max(rel(h, ref_h), rel(n, ref_n)), 0))
        copy_ms = ms(lambda: scratch.copy_(residual))
        rows.append(("  (copy of the residual inside the row above)", copy_ms, 0.0, 0))
        rows.append(("linear alone", ms(lambda: F.linear(act, w, b)), 0.0, 0))
    print(f"residual add + RMSNorm after a product [{tokens}, {inner}] x [{inner}, {width}], bias={bias}")
    for name, t, err, _ in rows:
        print(f"  {name:48s} {t:8.4f} ms  rel err {err:9.2e}")


def main():
    torch.manual_seed(0)
    rotary_variants()
    norm_variants(16384, 1280, 1280, bias=True)   # vision attention proj
    norm_variants(16384, 1280, 3456, bias=True)   # vision MLP down (padded)
    norm_variants(4128, 2048, 2048, bias=False)   # decoder o_proj
    norm_variants(4128, 2048, 11008, bias=False)  # decoder down_proj


if __name__ == "__main__":
    main()
