"""Why the module path's decode ms/token moves within one process: per `generate(disable_compile=True)` call of the
photo, its decode ms/token beside the call's wall and CPU time (equal when the host thread never waits or is
descheduled), the collections and milliseconds of Python's garbage collector, and the CPU MHz the kernel reports.
Rounds: after the first captured call, after the other cases' graphs, with `gc.freeze()`, with the collector off,
and after the teacher is built and run (its dynamic cache, equally host-bound). A profile, not a speed claim.

    python benchmarks/host_speed_probe.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate_bench as g  # noqa: E402
from bench import build_infinitevl, build_teacher  # noqa: E402

NEW_TOKENS = 128


class CollectorClock:
    """Collections and seconds spent in them per generation (`gc.callbacks`)."""

    def __init__(self):
        self.reset()
        self._start = 0.0
        gc.callbacks.append(self)

    def reset(self):
        self.seconds, self.counts = {0: 0.0, 1: 0.0, 2: 0.0}, {0: 0, 1: 0, 2: 0}

    def __call__(self, phase, info):
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds[info["generation"]] += time.perf_counter() - self._start
            self.counts[info["generation"]] += 1


def cpu_mhz() -> tuple[int, int]:
    values = [float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz")]
    return round(statistics.mean(values)), round(max(values))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="h200_host_speed_probe")
    args = parser.parse_args(argv)
    lines = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    clock = CollectorClock()
    processor = g.bench_processor(g.PAGE[0] * g.PAGE[1])

    def cuda_inputs(case):
        return g.on_cuda(g.case_inputs(processor, case))

    photo = cuda_inputs("photo")
    model = build_infinitevl()
    g.use_tokenizer_ids(model.config, processor.tokenizer)

    def call(m, n, inputs=photo, **flags):
        torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            m.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, **flags)
        torch.cuda.synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu

    def rounds(label, m, k=3, **flags):
        for _ in range(k):
            clock.reset()
            first, _ = call(m, 1, **flags)
            wall, cpu = call(m, NEW_TOKENS, **flags)
            # (MHz: mean and max over the CPUs; cpu#: CPUs the process may run on; objs: objects the collector tracks)
            say(f"{label}: decode {g.decode_ms(first, wall, NEW_TOKENS):.1f} ms/tok wall {wall:.2f} s cpu {cpu:.2f} s "
                f"gc counts {dict(clock.counts)} gc ms { ({k: round(v * 1e3, 1) for k, v in clock.seconds.items()}) } "
                f"MHz {cpu_mhz()} cpu#{len(os.sched_getaffinity(0))} objs {len(gc.get_objects())}")

    say(f"threads {torch.get_num_threads()} affinity {len(os.sched_getaffinity(0))} MHz {cpu_mhz()}")
    call(model, NEW_TOKENS)  # the captured path's first call
    # (the first round's first line includes the module path's one-time costs in its 1-token call)
    rounds("module first", model, disable_compile=True)
    for case in ("page", "text_1k", "photo_x8"):
        call(model, 8, cuda_inputs(case))
    rounds("module after graphs", model, disable_compile=True)
    gc.freeze()
    rounds("module gc.freeze", model, disable_compile=True)
    gc.unfreeze()
    gc.disable()
    rounds("module gc off", model, disable_compile=True)
    gc.enable()
    teacher = build_teacher()
    g.use_tokenizer_ids(teacher.config, processor.tokenizer)
    rounds("teacher dynamic", teacher, k=2)
    rounds("module after teacher", model, disable_compile=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
