"""Side-by-side GPU benchmark: InfiniteVL-4B against its Qwen2.5-VL-3B teacher, random bf16 weights, batch 1.

One process, one GPU, the same inputs for both models. Measures per context length: prefill seconds
and tokens/s, decode ms/token (median of >= 32 steps after warm-up, CUDA events), peak GPU memory;
the decode floor (weight bytes read per token + state bytes, over the copy bandwidth measured in the
same run); and streaming frames/s of 448x448 frames (256 tokens each, vision tower included).

    python benchmarks/bench.py --out benchmarks/results            # everything
    python benchmarks/bench.py --lengths 1024 8192 --frames 200    # a quick look

Writes results.json, results.md and PNG plots to --out.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ROOT / "tests" / "data" / "official_config.json"
GiB = 1024**3


def log(*args):
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


def copy_bandwidth(nbytes: int = 2 * GiB, repeats: int = 20) -> float:
    """Device-to-device copy, bytes read + written per second (median of `repeats`)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def environment() -> dict:
    import transformers

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    try:
        import fla

        info["fla"] = getattr(fla, "__version__", "installed")
    except Exception as error:  # noqa: BLE001 - report why, do not fail the benchmark
        info["fla"] = f"unavailable ({type(error).__name__})"
    try:
        info["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        info["driver"] = "unknown"
    return info


def build_infinitevl():
    from infinitevl_hf import InfiniteVLConfig, InfiniteVLForConditionalGeneration

    config = InfiniteVLConfig(**json.loads(OFFICIAL.read_text()))
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = InfiniteVLForConditionalGeneration(config)
    return model.to(torch.bfloat16).eval()


def build_teacher():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    official = json.loads(OFFICIAL.read_text())
    text_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "rope_theta")
    vision = {k: v for k, v in official["vision_config"].items() if k not in ("model_type", "in_chans", "spatial_patch_size", "torch_dtype")}
    config = Qwen2_5_VLConfig(
        text_config={**{k: official[k] for k in text_keys}, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
                     "max_position_embeddings": 1 << 20},
        vision_config=vision,
        tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    return model.to(torch.bfloat16).eval()


def decoder_weight_bytes(model) -> int:
    """Bytes a decode step reads: every decoder parameter once (embedding rows aside), plus the lm_head matrix."""
    total = 0
    for name, p in model.named_parameters():
        if "visual" in name or "embed_tokens" in name:
            continue
        total += p.numel() * p.element_size()
    lm_head = model.get_output_embeddings().weight
    if not any(n.startswith("lm_head") for n, _ in model.named_parameters()):
        total += lm_head.numel() * lm_head.element_size()  # tied: still read once per token
    return total


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


# Prompts up to this length are timed as the median of PREFILL_REPEATS runs (a fresh cache each); longer ones
# once. One run of a ~0.1 s prompt moves by several percent with the card's clock (seen on an H200: 105 to
# 113 ms for the same 8K prompt), which the 256K/8K ratio would inherit.
SHORT_PROMPT_TOKENS, PREFILL_REPEATS = 32768, 5


def prefill_seconds(run, new_cache, length: int) -> tuple[float, list[float], object]:
    """`run(cache)` timed on fresh caches from `new_cache()`: the median of several runs for a short prompt, one
    run for a long one. Returns (seconds, every run's seconds, the last run's cache for the decode timing). Each
    cache is dropped before the next run starts, so the peak memory is that of one run."""
    runs = []
    for _ in range(PREFILL_REPEATS if length <= SHORT_PROMPT_TOKENS else 1):
        cache = None
        gc.collect()
        cache = new_cache()
        runs.append(timed(lambda: run(cache)))
    return statistics.median(runs), [round(s, 5) for s in runs], cache


def event_times(fn, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end))
    return out


def infinitevl_context(model, length: int, steps: int, cache_kwarg: str, compile: str | None = None,
                       concat: bool = False, matvec: bool = False) -> dict:
    from infinitevl_hf import InfiniteVLCache
    from infinitevl_hf.speed.graph_capture import CUDAGraphDecoder

    ids = torch.randint(0, 150000, (1, length), device="cuda")
    with torch.no_grad():  # warm-up: kernels autotune and compile outside the timed region
        warm = min(length, 2 * (model.config.text_config.prefill_chunk_tokens or length))
        model(input_ids=ids[:, :warm], use_cache=True, logits_to_keep=1, **{cache_kwarg: InfiniteVLCache(model.config)})
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        seconds, runs, cache = prefill_seconds(
            lambda c: model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kwarg: c}),
            lambda: InfiniteVLCache(model.config), length)
        peak = torch.cuda.max_memory_allocated() / GiB
        start = time.perf_counter()
        if compile in ("modules", "layers"):  # benchmark-only variants: torch.compile the modules themselves
            for layer in model.model.language_model.layers:
                modules = [layer] if compile == "layers" else [layer.input_layernorm, layer.post_attention_layernorm, layer.mlp]
                for module in modules:
                    module.compile(dynamic=False)
        decoder = CUDAGraphDecoder(model, cache, warmup_steps=2 if compile is None else 3, compile=compile == "fused",
                                   concat_projections=concat, triton_matvec=matvec)
        capture_s = time.perf_counter() - start
        token = torch.randint(0, 150000, (1, 1), device="cuda")
        for _ in range(8):
            decoder.step(token)
        ms = event_times(lambda: decoder.step(token), steps)
    state = cache.nbytes
    del cache, decoder, ids
    return {"prefill_s": seconds, "prefill_runs_s": runs, "prefill_tok_s": length / seconds,
            "decode_ms": statistics.median(ms), "peak_gib": peak, "cache_bytes": state, "graph_build_s": capture_s}


def teacher_context(model, length: int, steps: int, cache_kwarg: str) -> dict:
    from transformers import DynamicCache

    ids = torch.randint(0, 150000, (1, length), device="cuda")
    with torch.no_grad():  # warm-up outside the timed region
        model(input_ids=ids[:, : min(length, 1024)], use_cache=True, logits_to_keep=1,
              **{cache_kwarg: DynamicCache(config=model.config.get_text_config())})
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        seconds, runs, cache = prefill_seconds(
            lambda c: model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kwarg: c}),
            lambda: DynamicCache(config=model.config.get_text_config()), length)
        peak = torch.cuda.max_memory_allocated() / GiB
        token = torch.randint(0, 150000, (1, 1), device="cuda")

        def step():
            model(input_ids=token, use_cache=True, logits_to_keep=1, **{cache_kwarg: cache})

        for _ in range(4):
            step()
        ms = event_times(step, steps)
    del cache, ids
    return {"prefill_s": seconds, "prefill_runs_s": runs, "prefill_tok_s": length / seconds,
            "decode_ms": statistics.median(ms), "peak_gib": peak}


def teacher_static_context(model, length: int, new_tokens: int = 65) -> dict:
    """The teacher as transformers decodes fastest: `generate(cache_implementation="static")`, which compiles the
    decode step (`torch.compile`, CUDA graphs). generate() allows no per-step events, so decode ms/token is
    (time of `new_tokens` tokens - time of 1 token) / (new_tokens - 1), each the median of 3 runs after a
    warm-up that compiles for this length's cache."""
    ids = torch.randint(0, 150000, (1, length), device="cuda")

    def run(n):
        return timed(lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                            cache_implementation="static"))

    with torch.no_grad():
        compile_s = run(new_tokens)  # compiles (and captures) for this cache length
        run(new_tokens)
        torch.cuda.reset_peak_memory_stats()
        one = statistics.median(run(1) for _ in range(3))
        many = statistics.median(run(new_tokens) for _ in range(3))
    return {"decode_ms": 1e3 * (many - one) / (new_tokens - 1), "first_call_s": compile_s,
            "peak_gib": torch.cuda.max_memory_allocated() / GiB}


def frame_inputs(model, group: int = 1):
    """`group` 448x448 frames per call: each 32x32 patches of 14 -> 256 merged tokens in vision start/end."""
    config = model.config
    patches = 32 * 32
    one = [config.vision_start_token_id] + [config.image_token_id] * 256 + [config.vision_end_token_id]
    ids = torch.tensor([one * group], device="cuda")
    grid = torch.tensor([[1, 32, 32]] * group, device="cuda")
    pixels = [torch.randn(group * patches, 3 * 2 * 14 * 14, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    return ids, grid, pixels


def streaming(model, frames: int, cache_kwarg: str, group: int = 1, graph: bool = False) -> dict:
    """Feed `frames` frames, `group` per call, through one cache; frames/s over the last 90% of calls.
    graph: after the first call, each call replays one captured CUDA graph (vision tower, embeddings, decoder)."""
    from infinitevl_hf import InfiniteVLCache
    from infinitevl_hf.speed.frame_graphs import CUDAGraphFrames

    ids, grid, pixels = frame_inputs(model, group)
    cache = InfiniteVLCache(model.config)
    times, memory = [], []
    calls = max(1, frames // group)
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        for i in range(calls):
            start = time.perf_counter()
            if graph and i > 0:
                if i == 1:
                    step = CUDAGraphFrames(model, cache, ids, image_grid_thw=grid)
                    start = time.perf_counter()  # capture time is not a frame's time
                step(pixels[i % len(pixels)])
            else:
                model(input_ids=ids, pixel_values=pixels[i % len(pixels)], image_grid_thw=grid, use_cache=True,
                      logits_to_keep=1, **{cache_kwarg: cache})
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            if i in (0, calls - 1):
                memory.append(torch.cuda.memory_allocated() / GiB)
    steady = times[len(times) // 10:]
    return {"frames": calls * group, "frames_per_call": group, "cuda_graph": graph,
            "frames_per_s": group * len(steady) / sum(steady),
            "tokens_per_frame": ids.shape[1] // group, "memory_first_gib": memory[0], "memory_last_gib": memory[-1],
            "cache_bytes": cache.nbytes, "peak_gib": torch.cuda.max_memory_allocated() / GiB,
            "ms_per_call_curve": [round(1e3 * t, 2) for t in times[:: max(1, calls // 200)]]}


def streaming_batched(model, frames: int, streams: int, cache_kwarg: str, group: int = 1, graph: bool = False) -> dict:
    """`streams` streams as the rows of one batch, `group` frames per row and call; with graph, every call after the
    first replays one captured CUDA graph."""
    from infinitevl_hf import InfiniteVLCache
    from infinitevl_hf.speed.frame_graphs import CUDAGraphFrames

    ids, grid, pixels = frame_inputs(model, group)
    ids = ids.expand(streams, -1).contiguous()
    grid = grid.repeat(streams, 1)
    pixel_batch = torch.cat([pixels[i % len(pixels)] for i in range(streams)])
    cache = InfiniteVLCache(model.config)
    calls = max(1, frames // group)
    with torch.no_grad():
        model(input_ids=ids, pixel_values=pixel_batch, image_grid_thw=grid, use_cache=True, logits_to_keep=1,
              **{cache_kwarg: cache})
        if graph:
            step = CUDAGraphFrames(model, cache, ids, image_grid_thw=grid)
            call = lambda: step(pixel_batch)  # noqa: E731
        else:
            call = lambda: model(input_ids=ids, pixel_values=pixel_batch, image_grid_thw=grid, use_cache=True,  # noqa: E731
                                 logits_to_keep=1, **{cache_kwarg: cache})
        for _ in range(2):
            call()
        seconds = timed(lambda: [call() for _ in range(calls)])
    return {"streams": streams, "frames_per_stream": calls * group, "frames_per_call": group, "cuda_graph": graph,
            "aggregate_frames_per_s": streams * calls * group / seconds}


def guarded(label: str, fn):
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        log(f"{label}: out of memory")
        return {"error": "out of memory"}
    except Exception as error:  # noqa: BLE001 - one failed measurement must not lose the others
        log(f"{label}: {type(error).__name__}: {str(error)[:300]}")
        return {"error": f"{type(error).__name__}: {str(error)[:200]}"}
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def write_outputs(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    env = results["environment"]
    lines = [
        f"# InfiniteVL-4B vs Qwen2.5-VL-3B teacher ({env['gpu']})",
        "",
        f"{env['date']}; torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}, fla {env['fla']}, "
        f"driver {env['driver']}. Random bf16 weights, batch 1. Copy bandwidth measured: {results['bandwidth_tb_s']:.2f} TB/s; "
        f"InfiniteVL decode floor {results.get('decode_floor_ms', float('nan')):.2f} ms/token.",
        "",
        "| context | InfiniteVL prefill s | tok/s | decode ms/tok | peak GiB | teacher prefill s | decode ms/tok | peak GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for length in sorted({int(k) for k in results["infinitevl"]} | {int(k) for k in results["teacher"]}):
        a = results["infinitevl"].get(str(length), {})
        b = results["teacher"].get(str(length), {})

        def f(row, key, fmt):
            return fmt.format(row[key]) if key in row else row.get("error", "-")

        lines.append(
            f"| {length} | {f(a, 'prefill_s', '{:.3f}')} | {f(a, 'prefill_tok_s', '{:.0f}')} | {f(a, 'decode_ms', '{:.2f}')} | "
            f"{f(a, 'peak_gib', '{:.1f}')} | {f(b, 'prefill_s', '{:.3f}')} | {f(b, 'decode_ms', '{:.2f}')} | {f(b, 'peak_gib', '{:.1f}')} |"
        )
    for s in results.get("streaming_groups", {}).values():
        if "frames_per_s" in s:
            lines += ["", f"Streaming, {s['frames_per_call']} frame(s) per call: {s['frames_per_s']:.1f} frames/s over "
                      f"{s['frames']} frames of 448x448 ({s['tokens_per_frame']} tokens each, vision tower included); "
                      f"memory {s['memory_first_gib']:.2f} GiB at the first call, {s['memory_last_gib']:.2f} GiB at the last."]
    if "streaming_batched" in results:
        s = results["streaming_batched"]
        lines += [f"Batched: {s.get('streams')} streams, {s.get('aggregate_frames_per_s', 0):.1f} frames/s in aggregate."]
    static = {k: v for k, v in results.get("teacher_static", {}).items() if "decode_ms" in v}
    if static:
        lines += ["", "Teacher with `generate(cache_implementation=\"static\")` (compiled decode step):"]
        for length, row in static.items():
            ours = results["infinitevl"].get(length, {}).get("decode_ms")
            ratio = f"; InfiniteVL {row['decode_ms'] / ours:.1f}x faster" if ours else ""
            lines.append(f"- {length} tokens: {row['decode_ms']:.2f} ms/token (first call {row['first_call_s']:.0f} s){ratio}")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: plots skipped")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, rows in (("InfiniteVL-4B", results["infinitevl"]), ("Qwen2.5-VL-3B (sdpa, DynamicCache)", results["teacher"])):
        xs = sorted(int(k) for k, v in rows.items() if "decode_ms" in v)
        axes[0].plot(xs, [rows[str(x)]["prefill_s"] for x in xs], "o-", label=name)
        axes[1].plot(xs, [rows[str(x)]["decode_ms"] for x in xs], "o-", label=name)
        axes[2].plot(xs, [rows[str(x)]["peak_gib"] for x in xs], "o-", label=name)
    static = {int(k): v["decode_ms"] for k, v in results.get("teacher_static", {}).items() if "decode_ms" in v}
    if static:
        xs = sorted(static)
        axes[1].plot(xs, [static[x] for x in xs], "s--", label="Qwen2.5-VL-3B (static cache, compiled)")
    if "decode_floor_ms" in results:
        axes[1].axhline(results["decode_floor_ms"], ls="--", c="gray", label="InfiniteVL bandwidth floor")
    for ax, title in zip(axes, ("prefill seconds", "decode ms/token", "peak GPU memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_title(title)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    fig.suptitle(f"{env['gpu']}, bf16, batch 1")
    fig.tight_layout()
    fig.savefig(out / "latency_memory.png", dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768, 131072, 262144, 524288, 1048576])
    parser.add_argument("--teacher-max", type=int, default=262144, help="longest context run on the teacher")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per context (median reported)")
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--frames-per-call", type=int, nargs="+", default=[1, 8],
                        help="frame group sizes for the single-stream measurement")
    parser.add_argument("--batched-frames-per-call", type=int, default=1, help="frames per stream and call, batched streams")
    parser.add_argument("--graph", action="store_true", help="replay each streamed call (after the first) from one CUDA graph")
    parser.add_argument("--skip-teacher", action="store_true")
    parser.add_argument("--skip-infinitevl", action="store_true")
    parser.add_argument("--resume", type=Path, default=None,
                        help="results.json of a first part of the run (same GPU) to complete, e.g. with --skip-infinitevl")
    parser.add_argument("--compile", choices=["kernels", "fused", "modules", "layers"], default=None,
                        help="decode graph of the fused layer steps over the package's kernels (concatenated projections, "
                        "the Triton matvec: what generate() builds for one row), the same steps compiled, compiled "
                        "norms/MLPs or compiled decoder layers")
    parser.add_argument("--teacher-static", type=int, nargs="*", default=[],
                        help="contexts at which to also time the teacher's compiled static-cache generate()")
    args = parser.parse_args(argv)

    from infinitevl_hf.modeling.compat import CACHE_KWARG

    results = {"environment": environment(), "infinitevl": {}, "teacher": {}}
    if args.resume:  # a run split in two (one command has a time limit): keep what the first part measured
        earlier = json.loads(args.resume.read_text())
        if earlier["environment"]["gpu"] != results["environment"]["gpu"]:
            raise SystemExit(f"--resume: {args.resume} was measured on {earlier['environment']['gpu']}, not here")
        results = {**earlier, "environment": results["environment"], "first_part_environment": earlier["environment"]}
    results["bandwidth_tb_s"] = copy_bandwidth() / 1e12
    log("environment", results["environment"], f"bandwidth {results['bandwidth_tb_s']:.2f} TB/s")

    if not args.skip_infinitevl:
        model = build_infinitevl()
        weight_bytes = decoder_weight_bytes(model)
        for length in args.lengths:
            row = guarded(f"infinitevl {length}", lambda: infinitevl_context(
                model, length, args.steps, CACHE_KWARG, args.compile, concat=args.compile in ("kernels", "fused"),
                matvec=args.compile in ("kernels", "fused")))
            results["infinitevl"][str(length)] = row
            log("infinitevl", length, row)
            write_outputs(results, args.out)
        state = next(r["cache_bytes"] for r in results["infinitevl"].values() if "cache_bytes" in r)
        results["decode_compile"] = args.compile
        results["decode_weight_bytes"] = weight_bytes
        results["decode_state_bytes"] = state
        results["decode_floor_ms"] = 1e3 * (weight_bytes + state) / (results["bandwidth_tb_s"] * 1e12)
        if args.frames:
            results["streaming_groups"] = {}
            for group in args.frames_per_call:
                row = guarded(f"streaming x{group}", lambda: streaming(model, args.frames, CACHE_KWARG, group, args.graph))
                results["streaming_groups"][str(group)] = row
                log("streaming", group, {k: v for k, v in row.items() if k != "ms_per_call_curve"})
            results["streaming"] = max(results["streaming_groups"].values(), key=lambda r: r.get("frames_per_s", 0))
            results["streaming_batched"] = guarded(
                "batched", lambda: streaming_batched(model, max(8, args.frames // 10), args.streams, CACHE_KWARG,
                                                     args.batched_frames_per_call, args.graph))
            log("batched", results["streaming_batched"])
        write_outputs(results, args.out)
        del model
        gc.collect()
        torch.cuda.empty_cache()

    if not args.skip_teacher:
        teacher = build_teacher()
        for length in [n for n in args.lengths if n <= args.teacher_max]:
            row = guarded(f"teacher {length}", lambda: teacher_context(teacher, length, args.steps, CACHE_KWARG))
            results["teacher"][str(length)] = row
            log("teacher", length, row)
            write_outputs(results, args.out)
        results["teacher_static"] = {}
        for length in args.teacher_static:
            row = guarded(f"teacher static {length}", lambda: teacher_static_context(teacher, length))
            results["teacher_static"][str(length)] = row
            log("teacher static", length, row)
            write_outputs(results, args.out)
    write_outputs(results, args.out)
    log("done")


if __name__ == "__main__":
    main()
