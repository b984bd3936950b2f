"""Where a streamed call of 448x448 frames (256 tokens each) spends its time: vision tower vs decoder
(eager and replayed from a CUDA graph; the whole call in one graph), then a profile of the tower's and the decoder's kernels.

    python benchmarks/profile_frame.py --group 8
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench import build_infinitevl, frame_inputs


def seconds(fn, repeats: int = 10) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def table(fn, rows: int, title: str) -> None:
    """Kernels of 3 calls of `fn`, by GPU time."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    print(f"--- {title}: kernels of 3 calls by GPU time")
    averages = prof.key_averages()
    try:
        print(averages.table(sort_by="device_time_total", row_limit=rows, max_name_column_width=70))
    except (AttributeError, KeyError):
        print(averages.table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))
    return averages


def kernel_counts(averages, rows: int) -> None:
    """GPU kernels (not the operators that launch them) by launches, with their total time: what a call's
    launch gaps are made of."""
    kernels = [e for e in averages if getattr(e, "device_type", None) is not None and "CUDA" in str(e.device_type)
               and e.cpu_time_total == 0]
    total = sum(e.count for e in kernels)
    print(f"--- {total} kernel launches in 3 calls ({total / 3:.0f} per call); by launches:")
    for e in sorted(kernels, key=lambda e: -e.count)[:rows]:
        device_us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        print(f"{e.count / 3:7.0f} per call {device_us / 3e3:8.3f} ms per call  {e.key[:110]}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=25, help="rows of the profile tables (0: timings only)")
    parser.add_argument("--group", type=int, nargs="+", default=[1], help="frames per call (several: one row each)")
    args = parser.parse_args(argv)

    from infinitevl_hf import InfiniteVLCache
    from infinitevl_hf.modeling.compat import CACHE_KWARG
    from infinitevl_hf.speed.graph_capture import CUDAGraphPrefill
    from infinitevl_hf.speed.frame_graphs import CUDAGraphFrames

    model = build_infinitevl()
    for group in args.group:
        ids, grid, pixels = frame_inputs(model, group)
        cache = InfiniteVLCache(model.config)

        def frame():
            model(input_ids=ids, pixel_values=pixels[0], image_grid_thw=grid, use_cache=True, logits_to_keep=1,
                  **{CACHE_KWARG: cache})

        def vision():
            model.model.vision_features(pixels[0], grid)

        with torch.no_grad():
            for _ in range(5):
                frame()
            embeds, positions = model.model.decoder_inputs(ids, pixel_values=pixels[0], image_grid_thw=grid, cache=cache)

            def decoder():
                model.model.language_model(inputs_embeds=embeds, position_ids=positions, use_cache=True, keep_last=1,
                                           **{CACHE_KWARG: cache})

            whole, tower, eager = seconds(frame), seconds(vision), seconds(decoder)
            graph = CUDAGraphPrefill(model, cache, ids.shape[1])
            replay = seconds(lambda: graph(embeds, positions))
            del graph
            whole_graph = CUDAGraphFrames(model, cache, ids, image_grid_thw=grid)
            whole_replay = seconds(lambda: whole_graph(pixels[0]))
            print(f"{group} frame(s) per call ({ids.shape[1]} tokens), ms per call / per frame:")
            for label, value in (("whole call (eager)", whole), ("vision tower", tower), ("decoder eager", eager),
                                 ("decoder graph", replay), ("whole call graph", whole_replay)):
                print(f"  {label:20s} {1e3 * value:8.2f} {1e3 * value / group:8.2f}")
            if args.rows:
                table(vision, args.rows, f"vision tower, {group} frames")
                table(decoder, args.rows, f"decoder eager, {ids.shape[1]} tokens")
        del cache, whole_graph


if __name__ == "__main__":
    main()
