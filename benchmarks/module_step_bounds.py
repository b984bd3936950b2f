"""How much of the module path's decode step is its per-call decisions: an upper bound, not a speed-up.

A module-path decode step decides, on every call, which kernel serves each op (`ops.dispatch.Op.select`), whether a
group of projections is laid out side by side (`joined_linear.joined_weight`) and each Triton launch's signature
(`ops.triton_launch._launch`). Here a first step records those answers in the order it made them and later steps
replay them instead of deciding again (valid only because nothing about the model, the cache or the inputs changes
between the steps timed; the package cannot assume that). The gap between a plain step and a replayed one bounds
what caching the decisions could save. Variants alternate in rounds in one process (host speed moves between
processes and machines). Also: `generate(disable_compile=True)` of the photo per token, the plain step's wall time
and host time (enqueue without waiting), a cProfile of a 33-token `generate()` grouped by file, and the torch ops the
host issues per step. InfiniteVL-4B's released config, random bf16 weights.

    python benchmarks/module_step_bounds.py --rounds 2 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import build_infinitevl, environment, log  # noqa: E402
from generate_bench import (  # noqa: E402
    PHOTO, bench_processor, case_inputs, decode_ms, greedy_seconds, on_cuda, use_tokenizer_ids,
)


class Recorded:
    """Answers of one recorded step, handed back in the same order on later steps."""

    def __init__(self):
        self.answers, self.position, self.recording = [], 0, True

    def __call__(self, decide):
        if self.recording:
            answer = decide()
            self.answers.append(answer)
            return answer
        answer = self.answers[self.position]
        self.position += 1
        return answer


def replaying(names: tuple[str, ...]):
    """Patches that record (then replay) the decisions in `names`; returns (recorders, undo)."""
    from infinitevl_hf.modeling import joined_linear, mlp
    from infinitevl_hf.modeling.ops import dispatch, triton_launch

    select, joined, launch = dispatch.Op.select, joined_linear.joined_weight, triton_launch._launch
    recorders = {name: Recorded() for name in names}
    if "select" in names:
        r = recorders["select"]
        dispatch.Op.select = lambda self, *a, reference=False, **k: r(lambda: select(self, *a, reference=reference, **k))
    if "joined" in names:
        r2 = recorders["joined"]
        joined_linear.joined_weight = mlp.joined_weight = (
            lambda linears, cls=torch.nn.Linear: r2(lambda: joined(linears, cls)))  # (mlp imports it by name)
    if "launch" in names:
        r3 = recorders["launch"]

        def recorded_launch(kernel, grid, args, kwargs, keywords):
            if r3.recording:
                compiled = launch(kernel, grid, args, kwargs, keywords)
                kept = [v for v in triton_launch._signatures.get(kernel, {}).values() if v[0] is compiled]
                r3.answers.append(kept[0] if kept else None)
                return compiled
            hit = r3.answers[r3.position]
            r3.position += 1
            if hit is None:
                return launch(kernel, grid, args, kwargs, keywords)
            compiled, rest = hit
            grid = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
            compiled.run(*grid, torch.cuda.current_stream().cuda_stream, compiled.function, compiled.packed_metadata,
                         None, None, None, *(args + rest))
            return compiled

        triton_launch._launch = recorded_launch

    def undo():
        dispatch.Op.select, triton_launch._launch = select, launch
        joined_linear.joined_weight = mlp.joined_weight = joined

    return recorders, undo


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="h200_module_step_bounds")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    from infinitevl_hf import InfiniteVLCache
    from infinitevl_hf.modeling.compat import CACHE_KWARG

    processor = bench_processor(PHOTO[0] * PHOTO[1])
    model = build_infinitevl()
    use_tokenizer_ids(model.config, processor.tokenizer)
    inputs = on_cuda(case_inputs(processor, "photo"))
    lines, results = [], {"environment": environment(), "step_ms": collections.defaultdict(list)}

    def say(line: str) -> None:
        log(line)
        lines.append(line)

    def generate(n: int):
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, disable_compile=True)

    with torch.no_grad():
        generate(8)  # lays the weights out (as every CUDA generate() does) and compiles the kernels
        first = statistics.median(greedy_seconds(model, inputs, 1, disable_compile=True) for _ in range(3))
        answer = statistics.median(greedy_seconds(model, inputs, 49, disable_compile=True) for _ in range(3))
        results["generate_ms_per_token"] = decode_ms(first, answer, 49)
        say(f"generate(disable_compile=True), photo: {results['generate_ms_per_token']:.2f} ms a token")

        cache = InfiniteVLCache(model.config)
        prompt = inputs["input_ids"][:, -39:]  # the text after the image (a step needs no vision inputs)
        token = prompt[:, -1:].clone()
        model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{CACHE_KWARG: cache})
        cache.to_static()

        def step():
            return model(input_ids=token, use_cache=True, logits_to_keep=1, **{CACHE_KWARG: cache})

        def time_steps(label: str, one) -> None:
            for _ in range(3):
                one()
            walls = []
            for _ in range(20):
                torch.cuda.synchronize()
                start = time.perf_counter()
                one()
                torch.cuda.synchronize()
                walls.append(time.perf_counter() - start)
            start = time.perf_counter()
            for _ in range(20):
                one()
            host = (time.perf_counter() - start) / 20
            torch.cuda.synchronize()
            results["step_ms"][label].append({"wall": 1e3 * statistics.median(walls), "host": 1e3 * host})
            say(f"{label}: step wall {1e3 * statistics.median(walls):.2f} ms, host {1e3 * host:.2f} ms")

        variants = {"plain": (), "replay select": ("select",), "replay joined": ("joined",),
                    "replay launch": ("launch",), "replay all three": ("select", "joined", "launch")}
        for _ in range(args.rounds):
            for label, names in variants.items():
                recorders, undo = replaying(names)
                try:
                    step()  # the recording
                    for r in recorders.values():
                        r.recording = False

                    def replayed():
                        for r in recorders.values():
                            r.position = 0
                        step()
                        for r in recorders.values():  # a step that asked otherwise than the recorded one
                            if r.position != len(r.answers):
                                raise RuntimeError(f"{label}: {r.position} answers asked for, {len(r.answers)} recorded")

                    time_steps(label, replayed)
                finally:
                    undo()
        results["median_wall_ms"] = {k: statistics.median(r["wall"] for r in v) for k, v in results["step_ms"].items()}

        profiler = cProfile.Profile()
        generate(2)
        profiler.enable()
        generate(33)
        profiler.disable()
        by_file = collections.Counter()
        for (path, _, function), (_, _, own, _, _) in pstats.Stats(profiler).stats.items():
            for part in ("infinitevl_hf/", "transformers/", "torch/", "triton/", "fla/"):
                if part in path:
                    path = path[path.index(part):]
                    break
            by_file["builtin " + function if path == "~" else path] += own
        total = sum(by_file.values())
        say(f"cProfile of generate(33) (prompt included; profiled times are inflated, read them as shares): {total:.3f} s")
        for name, own in by_file.most_common(30):
            say(f"  {100 * own / total:5.1f}%  {name}")
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as traced:
            for _ in range(5):
                step()
        ops = collections.Counter(e.name for e in traced.events() if e.device_type.name == "CPU")
        say(f"host events per step: {sum(ops.values()) / 5:.0f}")
        for name, count in ops.most_common(12):
            say(f"  {count / 5:6.0f}  {name}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=2))
    (args.out / f"{args.name}.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
