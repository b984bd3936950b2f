"""Where a decode step of InfiniteVL-4B spends its GPU time: torch.profiler over eager static-cache steps.

    python benchmarks/profile_decode.py --context 1024
    python benchmarks/profile_decode.py --fused --kernels --batch 8     # the 8-row graph step's kernels
    python benchmarks/profile_decode.py --host                          # the module path's host time by op
    python benchmarks/profile_decode.py --host --plain-layout           # ... with each projection its own product
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench import build_infinitevl


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--fused", action="store_true", help="profile the DecodeStep instead of the modules")
    parser.add_argument("--trace", help="also write the Chrome trace (every kernel with its grid) to this path")
    parser.add_argument("--kernels", action="store_true", help="with --fused: joined projections and the Triton kernels, as generate() runs it (not compiled; cuBLAS's products with more than one row)")
    parser.add_argument("--batch", type=int, default=1, help="rows decoded together")
    parser.add_argument("--host", action="store_true", help="sort the table by host (CPU) time instead of GPU time")
    parser.add_argument("--plain-layout", action="store_true",
                        help="the module path over the weights as loaded (generate() lays them out first, and the "
                             "module path's decode then joins each layer's input projections)")
    args = parser.parse_args(argv)

    from infinitevl_hf import InfiniteVLCache
    from infinitevl_hf.modeling.compat import CACHE_KWARG
    from infinitevl_hf.speed.decode_step import DecodeStep

    model = build_infinitevl()
    if not args.plain_layout:
        from infinitevl_hf.speed.weight_layout import lay_out_weights

        lay_out_weights(model)  # as generate() does on CUDA before its first graph or module-path decode
    cache = InfiniteVLCache(model.config)
    ids = torch.randint(0, 150000, (args.batch, args.context), device="cuda")
    token = torch.randint(0, 150000, (args.batch, 1), device="cuda")
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **{CACHE_KWARG: cache})
        cache.to_static()
        if args.fused:
            compile = not args.kernels  # with the kernels, as generate() builds it: not compiled
            fused = DecodeStep(model, cache, compile=compile, concat_projections=args.kernels, triton_matvec=args.kernels)
            step = lambda: fused(token)  # noqa: E731
        else:
            step = lambda: model(input_ids=token, use_cache=True, logits_to_keep=1, **{CACHE_KWARG: cache})  # noqa: E731
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        walls = []
        for _ in range(10):  # unprofiled: what a step takes, host and GPU together
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - start)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
    if args.trace:
        prof.export_chrome_trace(args.trace)
    averages = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy = sum(e.time_range.elapsed_us() for e in kernels) / args.steps / 1e3
    print(f"batch {args.batch}: {1e3 * statistics.median(walls):.2f} ms per step unprofiled (median of 10), "
          f"{len(kernels) / args.steps:.0f} GPU kernels per step, {busy:.3f} ms of kernel time per step")
    sort = "cpu_time_total" if args.host else "device_time_total"
    try:
        print(averages.table(sort_by=sort, row_limit=args.rows, max_name_column_width=70))
    except (AttributeError, KeyError):
        print(averages.table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
