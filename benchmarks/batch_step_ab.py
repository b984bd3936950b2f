"""A batch's captured decode step, two ways in one process: the layer functions `torch.compile`d (cuBLAS's products
with inductor's fusions of the torch ops between them: what `generate()` replayed for batches before) and the
package's kernels between cuBLAS's products, not compiled (what it replays now). Rounds alternate the two graphs
over forks of one cache, so that a drift of the machine's speed falls on both; kernels per step are counted from a
profiled replay of each. A profile of one step, not an end-to-end result (`generate_bench.py` is that).

    python benchmarks/batch_step_ab.py --rows 8 --context 384
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench import build_infinitevl, event_times, log

VARIANTS = {"compiled": True, "kernels": False}


def kernels_per_replay(decoder, token, steps: int = 3) -> float:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            decoder.step(token)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA") / steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--context", type=int, default=384)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--name", default="batch_step_ab")
    args = parser.parse_args(argv)

    from infinitevl_hf import InfiniteVLCache
    from infinitevl_hf.modeling.compat import CACHE_KWARG
    from infinitevl_hf.speed.graph_capture import CUDAGraphDecoder

    model = build_infinitevl()
    ids = torch.randint(0, 150000, (args.rows, args.context), device="cuda")
    token = torch.randint(0, 150000, (args.rows, 1), device="cuda")
    with torch.no_grad():
        cache = InfiniteVLCache(model.config)
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **{CACHE_KWARG: cache})
        cache.to_static()
        decoders = {}
        for name, compile in VARIANTS.items():
            decoders[name] = CUDAGraphDecoder(model, cache.fork(), compile=compile, concat_projections=True,
                                              triton_matvec=True)
            log(name, "captured")
        logits = {name: d.step(token).float().clone() for name, d in decoders.items()}
        kernels = {name: kernels_per_replay(d, token) for name, d in decoders.items()}
        rounds = {name: [] for name in VARIANTS}
        for _ in range(args.rounds):
            for name, decoder in decoders.items():
                rounds[name].append(statistics.median(event_times(lambda: decoder.step(token), args.steps)))
    compiled, kernels_ = logits["compiled"], logits["kernels"]
    result = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": args.rows, "context": args.context,
        "ms_per_step_rounds": rounds, "ms_per_step_median": {n: statistics.median(r) for n, r in rounds.items()},
        "kernels_per_step": kernels,
        "first_step_logits_rel_diff": ((kernels_ - compiled).norm() / compiled.norm()).item(),
        "first_step_argmax_agree": float((kernels_.argmax(-1) == compiled.argmax(-1)).float().mean()),
    }
    med = result["ms_per_step_median"]
    result["compiled_over_kernels"] = med["compiled"] / med["kernels"]
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
