"""One-row products at InfiniteVL-4B's decode shapes: cuBLAS (`F.linear`) vs the Triton matvec, us and TB/s.

    python benchmarks/matvec_bench.py
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from bench import copy_bandwidth

SHAPES = {  # name: (out, in)
    "gdn q/k/v/a/b/g (joined)": (12320, 2048),
    "mlp gate/up (joined)": (22016, 2048),
    "mlp down": (2048, 11008),
    "gdn o_proj": (2048, 4096),
    "attn q/k/v (joined)": (2560, 2048),
    "lm_head": (151936, 2048),
}


def time_us(fn, repeats: int = 200) -> float:
    for _ in range(10):
        fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(20):
            fn()
    times = []
    for _ in range(repeats // 20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / 20)
    return statistics.median(times)


def main():
    from infinitevl_hf.modeling.ops.matvec import matvec

    bandwidth = copy_bandwidth() / 1e12
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {bandwidth:.2f} TB/s (CUDA-graph replays, median)")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x, w).float()
        err = ((matvec(x, w).float() - ref).norm() / ref.norm()).item()
        rows = []
        for label, fn in (("cublas", lambda: F.linear(x, w)), ("triton", lambda: matvec(x, w))):
            us = time_us(fn)
            rows.append(f"{label} {us:7.1f} us {w.numel() * 2 / us / 1e6:5.2f} TB/s")
        print(f"{name:26s} [{n}x{k}]  " + "  |  ".join(rows) + f"  | rel err {err:.1e}")


if __name__ == "__main__":
    main()
