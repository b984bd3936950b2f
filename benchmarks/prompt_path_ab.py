"""A captured prompt's attention path and length buckets, alternated in one process: `generate()` time to first
token and the whole answer of the page and the 1K-token text prompt, with the captured graphs dropped between
variants (each captures its own). Then the kernels of one text_1k prefill of the package's variant.

Variants:
- "package": as the package runs (a long padded prompt's attention through flex_attention's block mask; since
  session 19 over the prompt's own keys, not the window of empty slots before them);
- "empty window read": a captured prompt's attention over the empty ring's slots as well, masked (as before
  session 19: `InfiniteVLRingAttentionLayer.empty` never set);
- "dense mask": every fresh prompt's attention through sdpa with the dense window mask (`attention_paths`);
- "buckets 256 apart": prompts of 1K-2K tokens laid into lengths 256 apart, not 128 (`prompt_graphs.PROMPT_BUCKETS` as
  shipped before session 20; "finer buckets" in that session's results is the package's lengths since);
- "buckets 64 apart": prompts of 1K-2K tokens laid into lengths 64 apart (session 20's run: 64 apart from 192
  tokens on, the same lengths for its 1K-token prompt).

    python benchmarks/prompt_path_ab.py --rounds 3 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import build_infinitevl, environment, log  # noqa: E402
from generate_bench import PAGE, bench_processor, case_inputs, measure, use_tokenizer_ids  # noqa: E402
from module_path_ab import patched  # noqa: E402
from prompt_buckets import scheme  # noqa: E402
from prompt_latency import kernel_table  # noqa: E402


def dense_mask():
    from infinitevl_hf.modeling import attention_paths

    return patched(attention_paths, "long_chunk_path", lambda *args, **kwargs: None)


@contextlib.contextmanager
def empty_window_read():
    from infinitevl_hf.modeling.cache import InfiniteVLCache

    start_fresh = InfiniteVLCache.start_fresh_

    def fresh_but_unknown(self, start):
        start_fresh(self, start)
        for layer in self.layers:
            if hasattr(layer, "empty"):
                layer.empty = False

    with patched(InfiniteVLCache, "start_fresh_", fresh_but_unknown):
        yield


VARIANTS = {"package": contextlib.nullcontext, "empty window read": empty_window_read, "dense mask": dense_mask,
            "buckets 256 apart": lambda: scheme(256), "buckets 64 apart": lambda: scheme(64)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steady", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=["text_1k", "page"])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--name", default="h200_prompt_path_ab")
    args = parser.parse_args(argv)

    from infinitevl_hf.speed.decode_graphs import decode_graphs_of

    processor = bench_processor(PAGE[0] * PAGE[1])
    model = build_infinitevl()
    use_tokenizer_ids(model.config, processor.tokenizer)
    inputs = {case: case_inputs(processor, case) for case in args.cases}
    runs = {f"{case} {name}": [] for case in args.cases for name in args.variants}
    for round_ in range(args.rounds):
        for name in args.variants:
            with VARIANTS[name]():
                decode_graphs_of(model).clear()  # each variant captures its own prompts
                for case in args.cases:
                    result = measure(model, inputs[case], 128, args.steady)
                    runs[f"{case} {name}"].append(result)
                    log(f"round {round_ + 1} {case} {name}: TTFT {1e3 * result['ttft_s']:.1f} ms, "
                        f"answer {result['answer_s']:.3f} s")
    summary = {key: {"ttft_ms": 1e3 * statistics.median(r["ttft_s"] for r in results),
                     "answer_s": statistics.median(r["answer_s"] for r in results)} for key, results in runs.items()}
    for key, value in summary.items():
        log(f"{key}: TTFT {value['ttft_ms']:.1f} ms, answer {value['answer_s']:.3f} s (median of {args.rounds})")
    decode_graphs_of(model).clear()
    text = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in inputs[args.cases[0]].items()}
    with torch.no_grad():
        model.generate(**text, max_new_tokens=1)  # capture
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            model.generate(**text, max_new_tokens=1)
            torch.cuda.synchronize()
    table, total_ms = kernel_table(prof, rows=20)
    log(f"{args.cases[0]}, package: kernels {total_ms:.1f} ms\n{table}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {"environment": environment(), "rounds": args.rounds, "steady": args.steady, "summary": summary,
                  "runs": runs, "kernels_ms": total_ms}
        (args.out / f"{args.name}.json").write_text(json.dumps(record, indent=2))
        (args.out / f"{args.name}_kernels.txt").write_text(table)


if __name__ == "__main__":
    main()
