"""Long-run streaming check: many 448x448 frames through full-size InfiniteVL-4B (random bf16 weights).

Records frames/s over time, GPU memory at the start and end, cache bytes, and whether every cache
tensor is still finite at the end. Writes long_stream.json and long_stream.png to --out.

    python benchmarks/long_stream.py --frames 10000 --frames-per-call 8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench import GiB, build_infinitevl, environment, frame_inputs, log


def cache_tensors(cache):
    for layer in cache.layers:
        for name in ("keys", "values"):
            if isinstance(getattr(layer, name, None), torch.Tensor):
                yield getattr(layer, name)
        for states in (getattr(layer, "conv_states", {}), getattr(layer, "recurrent_states", {})):
            yield from (t for t in states.values() if t is not None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=10000)
    parser.add_argument("--frames-per-call", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)

    from infinitevl_hf import InfiniteVLCache
    from infinitevl_hf.modeling.compat import CACHE_KWARG

    model = build_infinitevl()
    group = args.frames_per_call
    ids, grid, pixels = frame_inputs(model, group)
    cache = InfiniteVLCache(model.config)
    calls = args.frames // group
    per_call, memory, cache_bytes = [], {}, {}
    with torch.no_grad():
        for i in range(calls):
            start = time.perf_counter()
            model(input_ids=ids, pixel_values=pixels[i % len(pixels)], image_grid_thw=grid, use_cache=True,
                  logits_to_keep=1, **{CACHE_KWARG: cache})
            torch.cuda.synchronize()
            per_call.append(time.perf_counter() - start)
            if i in (0, calls - 1):
                memory["first" if i == 0 else "last"] = torch.cuda.memory_allocated() / GiB
                cache_bytes["first" if i == 0 else "last"] = cache.nbytes
            if i % max(1, calls // 10) == 0:
                log(f"frame {(i + 1) * group}: {group / per_call[-1]:.1f} frames/s")
    finite = all(bool(torch.isfinite(t.float()).all()) for t in cache_tensors(cache))
    window = max(1, len(per_call) // 50)
    curve = [(min((i + window) * group, calls * group), group * window / sum(per_call[i : i + window]))
             for i in range(0, len(per_call) - window + 1, window)]
    result = {
        "environment": environment(),
        "frames": calls * group,
        "frames_per_call": group,
        "tokens_seen": cache.seen_tokens,
        "frames_per_s_overall": calls * group / sum(per_call),
        "frames_per_s_curve": curve,
        "gpu_memory_gib": memory,
        "cache_bytes": cache_bytes,
        "state_finite": finite,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "long_stream.json").write_text(json.dumps(result, indent=2))
    log({k: v for k, v in result.items() if k not in ("frames_per_s_curve", "environment")})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: plot skipped")
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([x for x, _ in curve], [y for _, y in curve], "-")
    ax.set_xlabel("frames streamed (448x448, 258 tokens each)")
    ax.set_ylabel("frames/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"InfiniteVL-4B on {result['environment']['gpu']}: GPU memory {memory['first']:.2f} -> "
                 f"{memory['last']:.2f} GiB, state finite: {finite}", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out / "long_stream.png", dpi=110)


if __name__ == "__main__":
    main()
