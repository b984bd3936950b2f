"""Decode ms/token of InfiniteVL-4B under each CUDA-graph variant (eager kernels, fused layer steps compiled or
not (`kernels_*`), with or without concatenated projections and the Triton matvec, compiled modules, compiled
layers).

    python benchmarks/decode_variants.py --context 1024
"""

from __future__ import annotations

import argparse
import json

import torch

from bench import build_infinitevl, guarded, infinitevl_context, log


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--variants", nargs="+", default=["none", "fused", "fused_concat", "modules", "layers"])
    args = parser.parse_args(argv)

    from infinitevl_hf.modeling.compat import CACHE_KWARG

    model = build_infinitevl()
    rows = {}
    for variant in args.variants:
        compile = None if variant == "none" else variant.split("_")[0]
        concat, matvec = "_concat" in variant, "_matvec" in variant
        rows[variant] = guarded(
            variant, lambda: infinitevl_context(model, args.context, args.steps, CACHE_KWARG, compile, concat, matvec))
        log(variant, rows[variant])
        for module in model.modules():  # undo module.compile() so the next variant starts from eager
            module._compiled_call_impl = None
        torch._dynamo.reset()
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
