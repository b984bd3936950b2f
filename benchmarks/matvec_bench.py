"""One-row products at InfiniteVL-4B's decode shapes: cuBLAS (`F.linear`) vs the Triton matvec, plain and with
its fused prologue/epilogues (RMSNorm, SiLU gate, short conv, residual), us and TB/s.

    python benchmarks/matvec_bench.py

Each product cycles through copies of its weight totalling >= 400 MB inside a CUDA graph, so the weights come
from DRAM as in a decode step rather than from the 50 MB L2.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from bench import copy_bandwidth

SHAPES = {  # name: (out, in, fused variants to time)
    "gdn q/k/v/a/b/g (joined)": (12320, 2048, ("rms", "rms+conv")),
    "mlp gate/up (joined)": (22016, 2048, ("rms", "rms+glu")),
    "mlp down": (2048, 11008, ("residual",)),
    "gdn o_proj": (2048, 4096, ("residual",)),
    "attn q/k/v (joined)": (2560, 2048, ("rms+bias",)),
    "attn o_proj": (2048, 2048, ("residual",)),
    "lm_head": (151936, 2048, ("rms",)),
}
DECODE_VARIANT = {  # the fused variant each shape runs in a decode step
    "gdn q/k/v/a/b/g (joined)": "rms+conv", "mlp gate/up (joined)": "rms+glu", "mlp down": "residual",
    "gdn o_proj": "residual", "attn q/k/v (joined)": "rms+bias", "attn o_proj": "residual", "lm_head": "rms",
}
SWEEP = [
    dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=st)
    for n in (1, 2, 4, 8, 16) for k in (256, 512, 1024, 2048) for w in (2, 4, 8) for st in (1,)
    if 1024 <= n * k <= 16384
]


def time_us(fns, repeats: int = 10) -> float:
    """Median us per call of fns (one call each per pass), replayed from a CUDA graph."""
    for fn in fns:
        fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(fns))
    return statistics.median(times)


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="time every block config of each shape's decode variant")
    args = parser.parse_args(argv)
    from infinitevl_hf.modeling.ops.matvec import ConvUpdate, matvec, rms_norm_matvec
    from infinitevl_hf.modeling.ops.matvec.triton_matvec import fused_matvec

    bandwidth = copy_bandwidth() / 1e12
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {bandwidth:.2f} TB/s (CUDA-graph replays, median)")
    dev, dt = "cuda", torch.bfloat16
    for name, (n, k, fused) in SHAPES.items():
        copies = max(1, -(-400_000_000 // (n * k * 2)))
        ws = [torch.randn(n, k, device=dev, dtype=dt) * k**-0.5 for _ in range(copies)]
        x, norm_w = torch.randn(1, k, device=dev, dtype=dt), torch.rand(k, device=dev, dtype=dt) + 0.5
        residual, bias = torch.randn(1, n, device=dev, dtype=dt), torch.randn(n, device=dev, dtype=dt)
        conv_w = torch.randn(8192, 4, device=dev, dtype=dt)
        states = tuple(torch.randn(1, s, 3, device=dev, dtype=dt) for s in (2048, 2048, 4096))
        variants = {
            "cublas": lambda w: F.linear(x, w),
            "triton": lambda w: matvec(x, w),
            "rms": lambda w: rms_norm_matvec(x, norm_w, 1e-6, w),
            "rms+bias": lambda w: rms_norm_matvec(x, norm_w, 1e-6, w, bias),
            "rms+conv": lambda w: rms_norm_matvec(x, norm_w, 1e-6, w, conv=ConvUpdate(conv_w, None, states)),
            "rms+glu": lambda w: rms_norm_matvec(x, norm_w, 1e-6, w, glu=True),
            "residual": lambda w: matvec(x, w, residual=residual),
        }
        if args.sweep:
            label = DECODE_VARIANT[name]
            kwargs = {"rms": dict(norm_weight=norm_w, eps=1e-6), "rms+bias": dict(norm_weight=norm_w, eps=1e-6, bias=bias),
                      "rms+conv": dict(norm_weight=norm_w, eps=1e-6, conv=ConvUpdate(conv_w, None, states)),
                      "rms+glu": dict(norm_weight=norm_w, eps=1e-6, glu=True), "residual": dict(residual=residual)}[label]
            timed = []
            for config in SWEEP:
                try:
                    us = time_us([lambda w=w, c=config: fused_matvec(x, w, config=c, **kwargs) for w in ws])
                except Exception as error:  # e.g. out of resources for a large tile
                    print(f"  {config}: {type(error).__name__}")
                    continue
                timed.append((us, config))
            timed.sort(key=lambda t: t[0])
            cublas = time_us([lambda w=w: F.linear(x, w) for w in ws])
            print(f"{name:25s} [{n}x{k}] {label}: cublas {cublas:.1f} us; best " + "; ".join(
                f"{us:.1f} us {c['BLOCK_N']}x{c['BLOCK_K']} w{c['num_warps']} s{c['num_stages']}" for us, c in timed[:4]), flush=True)
            continue
        rows = []
        for label in ("cublas", "triton", *fused):
            us = time_us([lambda w=w, f=variants[label]: f(w) for w in ws])
            rows.append(f"{label} {us:6.1f} us {n * k * 2 / us / 1e6:4.2f} TB/s")
        print(f"{name:25s} [{n}x{k}] " + " | ".join(rows), flush=True)


if __name__ == "__main__":
    main()
