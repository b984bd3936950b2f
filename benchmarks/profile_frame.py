"""Where one streamed 448x448 frame (256 tokens) spends its time: vision tower vs decoder, then a profile.

    python benchmarks/profile_frame.py
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=25, help="rows of the profile tables (0: timings only)")
    parser.add_argument("--group", type=int, default=1, help="frames per call")
    parser.add_argument("--vision", action="store_true", help="profile the vision tower alone")
    args = parser.parse_args(argv)

    from infinitevl_hf import InfiniteVLCache
    from infinitevl_hf.modeling.compat import CACHE_KWARG

    model = build_infinitevl()
    ids, grid, pixels = frame_inputs(model, args.group)
    cache = InfiniteVLCache(model.config)

    def frame():
        model(input_ids=ids, pixel_values=pixels[0], image_grid_thw=grid, use_cache=True, logits_to_keep=1,
              **{CACHE_KWARG: cache})

    with torch.no_grad():
        for _ in range(5):
            frame()
        embeds = model.model.get_input_embeddings()(ids)
        print(f"{args.group} frame(s) per call, ms per call:")
        print(f"whole call       {1e3 * seconds(frame):8.2f} ms")
        print(f"vision tower     {1e3 * seconds(lambda: model.model.get_image_features(pixels[0], grid)):8.2f} ms")
        print(f"decoder ({ids.shape[1]} t) {1e3 * seconds(lambda: model.model.language_model(inputs_embeds=embeds, use_cache=True, keep_last=1, **{CACHE_KWARG: cache})):8.2f} ms")
        if not args.rows:
            return
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                model.model.get_image_features(pixels[0], grid) if args.vision else frame()
            torch.cuda.synchronize()
    averages = prof.key_averages()
    for key in ("device_time_total",) if args.vision else ("cpu_time_total", "device_time_total"):
        try:
            print(averages.table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
        except (AttributeError, KeyError):
            print(averages.table(sort_by=key.replace("device", "cuda"), row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
