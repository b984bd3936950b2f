"""Time to first token (`generate(max_new_tokens=1)`) of a few prompts, and where the GPU spends it: the median of
steady calls, then one call under the torch profiler with its kernels sorted by GPU time. Point PYTHONPATH at two
checkouts of the package and run it on the same machine to compare them.

    python benchmarks/prompt_latency.py --cases page text_1k --out DIR --name NAME [--host-profile]

--host-profile also runs one steady call under cProfile and writes where its host time went (NAME_host.txt).
--timeline N times one steady call with N new tokens by its CUDA-graph replays (NAME_timeline.json): when the host
issued each replay and when the GPU ran it, both from the call's start, so that host time the GPU waits on shows
as the gap before the prompt's replay and between the decode steps'.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import build_infinitevl, environment, log, timed  # noqa: E402
from generate_bench import PAGE, bench_processor, case_inputs, use_tokenizer_ids  # noqa: E402


def kernel_table(prof, rows: int = 25) -> tuple[str, float]:
    """The profiler's table sorted by GPU time, and the GPU time of all kernels in ms."""
    events = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            table = events.table(sort_by=key, row_limit=rows, max_name_column_width=90)
            break
        except (AttributeError, KeyError, ValueError):
            continue
    total_us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in events)
    return table, total_us / 1e3


def host_profile(call, count: int = 45) -> str:
    """One call under cProfile (synchronised at the end): its functions by own time, then by cumulative time."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    call()
    torch.cuda.synchronize()
    profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("tottime").print_stats(count)
    stats.sort_stats("cumulative").print_stats(count)
    return stream.getvalue()


@contextlib.contextmanager
def replay_timer(record: list):
    """Every CUDA graph replay meanwhile appends (host clock when issued, start event, end event) to `record`."""
    original = torch.cuda.CUDAGraph.replay

    def replay(self):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        issued = time.perf_counter()
        start.record()
        original(self)
        end.record()
        record.append((issued, start, end))

    torch.cuda.CUDAGraph.replay = replay
    try:
        yield
    finally:
        torch.cuda.CUDAGraph.replay = original


def timeline(call) -> dict:
    """One call's CUDA-graph replays: host issue time and GPU start/duration (ms from the call's start; the GPU
    was idle at the start, so its clock starts with the host's), gaps where the GPU waited, and the call's end."""
    replays = []

    import infinitevl_hf.speed.decode_graphs as decode_graphs
    import infinitevl_hf.modeling.modeling_infinitevl as modeling

    spans, patched = [], []

    def span(owner, name):
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                spans.append((name, start, time.perf_counter()))

        patched.append((owner, name, inner))
        setattr(owner, name, timed)

    torch.cuda.synchronize()
    begin = torch.cuda.Event(enable_timing=True)
    begin.record()
    t0 = time.perf_counter()
    for owner, name in ((modeling, "plan_generation"), (decode_graphs, "prepare_prompt"),
                        (decode_graphs.DecodeGraphs, "prompt"), (type(call.model), "_prefill")):
        span(owner, name)
    try:
        with replay_timer(replays):
            call()
    finally:
        for owner, name, inner in reversed(patched):
            setattr(owner, name, inner)
    returned = time.perf_counter()
    finish = torch.cuda.Event(enable_timing=True)
    finish.record()
    torch.cuda.synchronize()
    rows = [{"issued_ms": 1e3 * (issued - t0), "gpu_start_ms": begin.elapsed_time(start), "gpu_ms": start.elapsed_time(end)}
            for issued, start, end in replays]
    gaps = [b["gpu_start_ms"] - (a["gpu_start_ms"] + a["gpu_ms"]) for a, b in zip(rows, rows[1:])]
    return {
        "returned_ms": 1e3 * (returned - t0),
        "gpu_done_ms": begin.elapsed_time(finish),
        "before_first_replay_ms": rows[0]["gpu_start_ms"] if rows else None,
        "after_last_replay_ms": begin.elapsed_time(finish) - rows[-1]["gpu_start_ms"] - rows[-1]["gpu_ms"] if rows else None,
        "replay_gpu_ms": sum(r["gpu_ms"] for r in rows),
        "gaps_between_replays_ms": {"sum": sum(gaps), "max": max(gaps, default=0.0),
                                     "median": statistics.median(gaps) if gaps else 0.0},
        "replays": rows[:3] + rows[-2:] if len(rows) > 5 else rows,
        "replay_count": len(rows),
        "host_spans_ms": [(name, 1e3 * (a - t0), 1e3 * (b - a)) for name, a, b in spans[:8]],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="+", default=["page", "text_1k"])
    parser.add_argument("--steady", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="prompt_latency")
    parser.add_argument("--host-profile", action="store_true", help="cProfile one steady call per case")
    parser.add_argument("--timeline", type=int, nargs="*", default=None, metavar="N",
                        help="time the graph replays of one steady call per case with each N new tokens (default 1)")
    args = parser.parse_args(argv)
    import infinitevl_hf

    processor = bench_processor(PAGE[0] * PAGE[1])
    model = build_infinitevl()
    use_tokenizer_ids(model.config, processor.tokenizer)
    results = {"environment": environment(), "package": str(Path(infinitevl_hf.__file__).parent), "cases": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    tables, host, timelines = [], [], {}
    if args.timeline == []:
        args.timeline = [1]
    for case in args.cases:
        inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in case_inputs(processor, case).items()}

        def first_token():
            return model.generate(**inputs, max_new_tokens=1, do_sample=False)

        with torch.no_grad():
            first = timed(first_token)
            timed(first_token)
            runs = [timed(first_token) for _ in range(args.steady)]
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                first_token()
                torch.cuda.synchronize()
            if args.host_profile:
                host.append(f"## {case}\n\n{host_profile(first_token)}")
            for new in args.timeline if args.timeline is not None else ():
                def answer(new=new):
                    return model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False)

                answer.model = model
                answer()
                timelines.setdefault(case, {})[str(new)] = timeline(answer)
                log(case, new, "new tokens:", json.dumps({k: v for k, v in timelines[case][str(new)].items() if k != "replays"}))
        table, gpu_ms = kernel_table(prof)
        results["cases"][case] = {"first_s": first, "ttft_s": statistics.median(runs), "runs_s": runs,
                                  "gpu_kernel_ms": gpu_ms, "prompt_tokens": int(inputs["input_ids"].shape[1])}
        log(case, json.dumps(results["cases"][case]))
        tables.append(f"## {case}: TTFT {1e3 * statistics.median(runs):.1f} ms, kernels {gpu_ms:.1f} ms\n\n{table}\n")
        (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.out / f"{args.name}_kernels.txt").write_text("\n".join(tables))
        if host:
            (args.out / f"{args.name}_host.txt").write_text("\n".join(host))
        if timelines:
            (args.out / f"{args.name}_timeline.json").write_text(json.dumps(timelines, indent=2) + "\n")


if __name__ == "__main__":
    main()
