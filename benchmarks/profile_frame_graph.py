"""Kernels of one streamed call replayed from its CUDA graph (vision tower, embeddings and decoder captured together).

    python benchmarks/profile_frame_graph.py --group 16
"""

from __future__ import annotations

import argparse

import torch

from bench import build_infinitevl, frame_inputs
from profile_frame import kernel_counts, seconds, table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", type=int, default=16, help="frames per call")
    parser.add_argument("--rows", type=int, default=40)
    args = parser.parse_args(argv)

    from infinitevl_hf import InfiniteVLCache
    from infinitevl_hf.modeling.compat import CACHE_KWARG
    from infinitevl_hf.speed.frame_graphs import CUDAGraphFrames

    model = build_infinitevl()
    ids, grid, pixels = frame_inputs(model, args.group)
    cache = InfiniteVLCache(model.config)
    with torch.no_grad():
        model(input_ids=ids, pixel_values=pixels[0], image_grid_thw=grid, use_cache=True, logits_to_keep=1,
              **{CACHE_KWARG: cache})
        step = CUDAGraphFrames(model, cache, ids, image_grid_thw=grid)
        # The graph is captured again once the rings' windows fill; time and profile only after that.
        while not all(cache.full_windows):
            step(pixels[1])
        step(pixels[1])
        replay = seconds(lambda: step(pixels[1]))
        synced = seconds(lambda: (step(pixels[1]), torch.cuda.synchronize()))
        print(f"{args.group} frames per call, whole call graph: {1e3 * replay:.2f} ms per call back to back, "
              f"{1e3 * synced:.2f} ms synchronised after each call (as bench.py streams), "
              f"{1e3 * replay / args.group:.2f} ms per frame")
        kernel_counts(table(lambda: step(pixels[1]), args.rows, "whole call graph"), args.rows)


if __name__ == "__main__":
    main()
