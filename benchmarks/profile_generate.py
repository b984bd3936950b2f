"""Where `generate()`'s time goes beyond the GPU work: the first call of a process by phase, the host time of
a prefill (`model(...)` alone vs `generate(max_new_tokens=1)`), and the host's top operations in a prefill
and in a module-path decode step. Random bf16 weights of the released config.

    python benchmarks/profile_generate.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import build_infinitevl, log, timed  # noqa: E402
from generate_bench import PAGE, bench_processor, case_inputs, use_tokenizer_ids  # noqa: E402



def host_time(fn) -> float:
    """Seconds until `fn` returns, without waiting for the GPU (what it takes to issue the work)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    issued = time.perf_counter() - start
    torch.cuda.synchronize()
    return issued


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--case", default="text_1k")
    args = parser.parse_args(argv)
    processor = bench_processor(PAGE[0] * PAGE[1])
    model = build_infinitevl()
    use_tokenizer_ids(model.config, processor.tokenizer)
    lines = []

    def say(*parts):
        line = " ".join(str(p) for p in parts)
        log(line)
        lines.append(line)

    for case in (args.case, "photo"):
        inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in case_inputs(processor, case).items()}
        gen = lambda n, **f: model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, **f)  # noqa: E731
        with torch.no_grad():
            say(case, "first forward of the prompt", f"{timed(lambda: model(**inputs, logits_to_keep=1)):.2f} s")
            say(case, "first generate(1)", f"{timed(lambda: gen(1)):.2f} s")
            say(case, "first generate(2) (compile + capture)", f"{timed(lambda: gen(2)):.2f} s")
            fwd = [timed(lambda: model(**inputs, logits_to_keep=1)) for _ in range(5)]
            fwd_host = [host_time(lambda: model(**inputs, logits_to_keep=1)) for _ in range(5)]
            one = [timed(lambda: gen(1)) for _ in range(5)]
            say(case, f"prefill forward median {1e3 * statistics.median(fwd):.1f} ms (host issue {1e3 * statistics.median(fwd_host):.1f} ms);"
                f" generate(1) median {1e3 * statistics.median(one):.1f} ms")
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                gen(1)
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=35, max_name_column_width=70)
            (args.out / f"profile_generate_{case}_prefill.txt").write_text(table)
            say(table[:6000])
            if case == args.case:
                gen(8, disable_compile=True)
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    gen(8, disable_compile=True)
                    torch.cuda.synchronize()
                table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=35, max_name_column_width=70)
                (args.out / f"profile_generate_{case}_module_decode.txt").write_text(table)
                say(table[:5000])
    (args.out / "profile_generate.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
