"""One module-path decode step (`model(token, cache)` over a static cache, batch 1) with the one-row products
through `ops.matvec` (`modeling.projection.project`) and with them through `nn.Linear`, alternating in one
process: what the projection route saves on this machine's host.

    python benchmarks/module_step_ab.py --context 300
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import build_infinitevl  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    from infinitevl_hf import InfiniteVLCache
    from infinitevl_hf.modeling import attention, gated_deltanet, mlp, modeling_infinitevl, projection
    from infinitevl_hf.modeling.compat import CACHE_KWARG

    users = (attention, gated_deltanet, mlp, modeling_infinitevl)
    routes = {"ops.matvec": projection.project, "nn.Linear": lambda linear, x: linear(x)}
    model = build_infinitevl()
    cache = InfiniteVLCache(model.config)
    ids = torch.randint(0, 150000, (1, args.context), device="cuda")
    token = torch.randint(0, 150000, (1, 1), device="cuda")
    times = {name: [] for name in routes}
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **{CACHE_KWARG: cache})
        cache.to_static()
        for _ in range(args.rounds):
            for name, route in routes.items():
                for module in users:
                    module.project = route
                for step in range(args.steps + 3):
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    model(input_ids=token, use_cache=True, logits_to_keep=1, **{CACHE_KWARG: cache})
                    torch.cuda.synchronize()
                    if step >= 3:
                        times[name].append(time.perf_counter() - start)
    for module in users:
        module.project = projection.project
    for name, values in times.items():
        print(f"module step, products through {name}: {1e3 * statistics.median(values):.2f} ms "
              f"(median of {len(values)}, {torch.cuda.get_device_name()})")


if __name__ == "__main__":
    main()
