"""Where the module path's decode step spends host time, by Python function (cProfile), with its kernels counted
by name and the host cost of a few single launches: InfiniteVL-4B (random bf16 weights), 300-token prompt, static
cache, weights laid out as generate() lays them out.

    python benchmarks/profile_module_step_python.py     (from the repository root)

cProfile slows each Python call, the small ones most: read its times as shares, not as the step's speed (the
"step wall" and "host enqueue" lines are unprofiled).
"""
import cProfile, pstats, time, statistics, sys, collections, io
sys.path.insert(0, "benchmarks")
import torch
from torch.profiler import ProfilerActivity, profile
from bench import build_infinitevl
from infinitevl_hf import InfiniteVLCache
from infinitevl_hf.modeling.compat import CACHE_KWARG
from infinitevl_hf.speed.weight_layout import lay_out_weights

model = build_infinitevl(); lay_out_weights(model)
cache = InfiniteVLCache(model.config)
ids = torch.randint(0, 150000, (1, 300), device="cuda"); token = torch.randint(0, 150000, (1, 1), device="cuda")
with torch.no_grad():
    model(input_ids=ids, use_cache=True, logits_to_keep=1, **{CACHE_KWARG: cache}); cache.to_static()
    step = lambda: model(input_ids=token, use_cache=True, logits_to_keep=1, **{CACHE_KWARG: cache})
    for _ in range(5): step()
    torch.cuda.synchronize()
    walls = []
    for _ in range(20):
        s = time.perf_counter(); step(); torch.cuda.synchronize(); walls.append(time.perf_counter() - s)
    print(f"step wall median {1e3*statistics.median(walls):.2f} ms, min {1e3*min(walls):.2f}")
    # host-only: enqueue 20 steps without syncing in between
    s = time.perf_counter()
    for _ in range(20): step()
    h = (time.perf_counter() - s) / 20; torch.cuda.synchronize()
    print(f"host enqueue per step {1e3*h:.2f} ms")
    pr = cProfile.Profile(); pr.enable()
    for _ in range(20): step()
    torch.cuda.synchronize(); pr.disable()
    out = io.StringIO(); st = pstats.Stats(pr, stream=out); st.sort_stats("tottime").print_stats(45); st.sort_stats("cumtime").print_stats(45)
    print(out.getvalue())
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5): step()
        torch.cuda.synchronize()
    names = collections.Counter(e.name[:90] for e in prof.events() if e.device_type.name == "CUDA")
    for n, c in names.most_common(60): print(f"{c/5:7.1f}  {n}")
    # launch overhead microbenchmarks
    from infinitevl_hf.modeling.ops.norms import rms_norm
    x = torch.randn(1, 1, 2048, device="cuda", dtype=torch.bfloat16); w = torch.ones(2048, device="cuda", dtype=torch.bfloat16)
    for name, fn in [("torch add", lambda: x + x), ("rms_norm op", lambda: rms_norm(x, w, 1e-6)),
                     ("F.linear 2048x2048", (lambda W: lambda: torch.nn.functional.linear(x, W))(torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)))]:
        for _ in range(50): fn()
        torch.cuda.synchronize(); s = time.perf_counter()
        for _ in range(2000): fn()
        e = (time.perf_counter() - s) / 2000; torch.cuda.synchronize()
        print(f"host per call {name}: {1e6*e:.1f} us")
