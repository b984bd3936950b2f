"""The first `generate()` of a fresh process (a photo + question, 128 new tokens), by phase: model build, the
call itself (kernel autotuning, compilation, graph capture), and a second and third call. Run it twice in a row to
see what the on-disk caches of Triton, inductor and fla's autotuning save a later process.

    python benchmarks/first_call.py [--out DIR] [--name NAME]

With TRITON_CACHE_DIR and TORCHINDUCTOR_CACHE_DIR pointed at empty folders it times a machine that never ran the
model; INFINITEVL_TUNED_KERNELS=0 turns off the recorded autotuning choices (`modeling/ops/tuned`).

Each call also reports where its time went, from timers put around the library entry points that pay one-time
costs: Triton's autotuner (benchmarking configs), Triton's JIT compiler, torch.compile (dynamo and inductor), the
package's two capture functions (prompt and decode step, warm-up runs included), and Python's garbage collector.
The timers are inclusive and nest (an autotuning run compiles; a capture's warm-up autotunes), so they do not sum
to the call's time. The second call is also profiled (cProfile, top functions by cumulative time; `--profile-first`:
the first call instead).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import gc
import io
import json
import pstats
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import build_infinitevl  # noqa: E402
from generate_bench import PAGE, bench_processor, case_inputs, use_tokenizer_ids  # noqa: E402


class PhaseTimers:
    """Wall time and calls of wrapped functions, per label; a re-entered label counts its outer call only."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._depth: dict[tuple[str, int], int] = defaultdict(int)
        self._main = threading.get_ident()
        self._gc_start = None
        gc.callbacks.append(self._gc)

    def wrap(self, owner, name: str, label: str) -> bool:
        original = getattr(owner, name, None)
        if original is None:
            return False

        @functools.wraps(original)
        def timed(*args, **kwargs):
            # per thread: compiles ahead run on worker threads (`speed.compile_ahead`), summed under their own label
            thread = threading.get_ident()
            self._depth[label, thread] += 1
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._depth[label, thread] -= 1
                if self._depth[label, thread] == 0:
                    key = label if thread == self._main else f"{label} [worker threads, summed]"
                    self.seconds[key] += time.perf_counter() - start
                    self.calls[key] += 1

        setattr(owner, name, timed)
        return True

    def _gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        elif self._gc_start is not None:
            self.seconds[f"gc (generation {info['generation']})"] += time.perf_counter() - self._gc_start
            self.calls[f"gc (generation {info['generation']})"] += 1

    def wrap_frames(self, owner, name: str, prefix: str) -> None:
        """Time each call of `owner.name(code, ...)` under its own label: `prefix` + the frame's function and line."""
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(code, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(code, *args, **kwargs)
            finally:
                label = f"{prefix}{code.co_name} ({Path(code.co_filename).name}:{code.co_firstlineno})"
                self.seconds[label] += time.perf_counter() - start
                self.calls[label] += 1

        setattr(owner, name, timed)

    def take(self) -> dict:
        """The counts since the last take, rounded, and reset."""
        report = {label: {"s": round(self.seconds[label], 3), "calls": self.calls[label]} for label in sorted(self.seconds)}
        self.seconds.clear()
        self.calls.clear()
        return report


def install_timers() -> PhaseTimers:
    import triton.runtime.autotuner as autotuner
    import triton.runtime.jit as jit

    from infinitevl_hf.speed import decode_graphs, graph_capture

    timers = PhaseTimers()
    timers.wrap(autotuner.Autotuner, "_bench", "triton autotune (config benchmarks)")
    timers.wrap(autotuner.Autotuner, "check_disk_cache", "triton autotune (disk cache lookups)")
    timers.wrap(jit.JITFunction, "_do_compile", "triton JIT compile (fla and package kernels)")
    try:
        import torch._dynamo.convert_frame as convert_frame

        timers.wrap(convert_frame, "_compile", "torch.compile (dynamo + inductor)")
        timers.wrap_frames(convert_frame, "_compile", "torch.compile frame: ")
        import torch._inductor.compile_fx as compile_fx

        timers.wrap(compile_fx, "compile_fx_inner", "inductor (graph compile)")
    except ImportError:
        pass
    timers.wrap(decode_graphs, "capture_prompt_graph", "capture: prompt (warm-up runs included)")
    timers.wrap(decode_graphs, "capture_decode_step", "capture: decode step (warm-up + compile included)")
    timers.wrap(graph_capture, "compile_ahead", "compile ahead (Triton kernels compiled on worker threads)")
    return timers


def top_functions(profiler: cProfile.Profile, count: int = 60) -> str:
    """The top functions by cumulative time, then by own time."""
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(count)
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(count // 2)
    return stream.getvalue()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None, help="folder for first_call.json and the second call's profile")
    parser.add_argument("--name", default="first_call", help="stem of the output files")
    parser.add_argument("--profile-first", action="store_true",
                        help="cProfile the first call instead of the second (its wall time then includes the profiler's)")
    args = parser.parse_args(argv)
    import os

    from infinitevl_hf.modeling.ops import tuned

    started = time.perf_counter()
    timers = install_timers()
    processor = bench_processor(PAGE[0] * PAGE[1])
    model = build_infinitevl()
    use_tokenizer_ids(model.config, processor.tokenizer)
    torch.cuda.synchronize()
    built = time.perf_counter()
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in case_inputs(processor, "photo").items()}
    report = {"build_s": round(built - started, 3), "build_phases": timers.take(),
              "triton_cache_dir": os.environ.get("TRITON_CACHE_DIR", "~/.triton/cache (default)"),
              "inductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default"),
              "recorded_autotuning": tuned.seeding_problem() or "seeded where recorded"}
    profile_text = ""
    profiled = "first" if args.profile_first else "second"
    for label in ("first", "second", "third"):
        profiler = cProfile.Profile() if label == profiled else None
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        model.generate(**inputs, max_new_tokens=128, min_new_tokens=128, do_sample=False)
        torch.cuda.synchronize()
        if profiler is not None:
            profiler.disable()
        key = f"{label}_generate_profiled_s" if profiler is not None else f"{label}_generate_s"
        report[key] = round(time.perf_counter() - start, 3)
        if label == "first":
            report["autotuning_choices_seeded"] = tuned.seed_for_current_device()
        report[f"{label}_phases"] = timers.take()
        if profiler is not None:
            profile_text = top_functions(profiler)
    print(json.dumps(report, indent=1))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / f"{args.name}_{profiled}_profile.txt").write_text(profile_text)


if __name__ == "__main__":
    main()
