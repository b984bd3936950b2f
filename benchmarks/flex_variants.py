"""Side-by-side timings of the decoder's sliding-window attention for one streamed 16-frame call (4,128 queries
over the 8,191 cached keys before them and their own), through flex_attention with and without the score_mod
that masks empty ring slots, and with other kernel tile options; each checked against the current version.

    python benchmarks/flex_variants.py
"""

from __future__ import annotations

import argparse

import torch
import triton.testing
from torch.nn.attention.flex_attention import flex_attention

from infinitevl_hf.modeling.ops.window_attention.flex import _window_block_mask, window_flex_attention


def ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4128)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    heads, kv_heads, dim, window, length = 16, 2, 128, 8192, args.tokens
    past = window - 1
    dev, dt = torch.device("cuda"), torch.bfloat16
    q = torch.randn(1, heads, length, dim, device=dev, dtype=dt)
    k = torch.randn(1, kv_heads, past + length, dim, device=dev, dtype=dt)
    v = torch.randn(1, kv_heads, past + length, dim, device=dev, dtype=dt)
    valid = torch.ones(1, past + length, dtype=torch.bool, device=dev)
    scale = dim**-0.5
    mask = _window_block_mask(past, length, window, str(dev))
    # band: every query sees `window` keys; two multiply-adds of `dim` per (query, key, head)
    flops = 4 * length * window * dim * heads
    with torch.no_grad():
        ref = window_flex_attention(q, k, v, past, window, scale, key_valid=valid)
        rows = [("current (score_mod on the slot flags)", lambda: window_flex_attention(q, k, v, past, window, scale,
                                                                                     key_valid=valid))]
        rows.append(("no score_mod", lambda: window_flex_attention(q, k, v, past, window, scale)))
        for options in ({"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
                        {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
                        {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
                        {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
                        {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 4, "num_stages": 4}):
            try:
                block_mask = mask
                if options["BLOCK_M"] != 128 or options["BLOCK_N"] != 128:
                    from torch.nn.attention.flex_attention import create_block_mask

                    def visible(b, h, q_idx, kv_idx):
                        offset = kv_idx - past
                        return (offset <= q_idx) & (offset > q_idx - window)

                    block_mask = create_block_mask(visible, None, None, length, past + length, device=dev,
                                                   BLOCK_SIZE=(options["BLOCK_M"], options["BLOCK_N"]))
                fn = torch.compile(flex_attention)
                call = (lambda fn=fn, bm=block_mask, o=options:
                        fn(q, k, v, block_mask=bm, scale=scale, enable_gqa=True, kernel_options=o).transpose(1, 2))
                call()
                rows.append((f"no score_mod, {options}", call))
            except Exception as error:  # a tile that does not fit shared memory: report and go on
                print(f"{options}: {type(error).__name__}: {str(error)[:200]}")
        from torch.nn.attention import SDPBackend, sdpa_kernel

        k_dense = k[:, :, :window].repeat_interleave(heads // kv_heads, 1)
        v_dense = v[:, :, :window].repeat_interleave(heads // kv_heads, 1)
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
            def dense(backend=backend):
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(q, k_dense, v_dense, scale=scale)
            try:
                dense()
                t = ms(dense)
                print(f"  (rate bound) sdpa {backend.name}, {length} queries x {window} keys, no mask: {t:.4f} ms, "
                      f"{flops / t / 1e9:.1f} TFLOP/s")
            except RuntimeError as error:
                print(f"  sdpa {backend.name}: {str(error)[:200]}")
        print(f"sliding-window attention, {length} queries, {past} cached keys, {heads}/{kv_heads} heads of {dim}")
        print(f"  {'variant':90s} {'ms':>8s} {'TFLOP/s':>8s} {'rel err':>9s}")
        for name, fn in rows:
            out = fn()
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            t = ms(fn)
            print(f"  {name:90s} {t:8.4f} {flops / t / 1e9:8.1f} {err:9.2e}")


if __name__ == "__main__":
    main()
