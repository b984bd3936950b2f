"""What a captured prompt's length buckets cost and save: for text prompts of given lengths, under each bucket
scheme, the length each is laid into, `generate(max_new_tokens=1)`'s time to first token (median of steady calls),
the GPU time of the prompt's graph replay, and, where the prompt's first call captured its bucket, that call's time
and the GPU memory the graph keeps (a length whose bucket an earlier length captured reports none). Schemes are
alternated in rounds in one process, their graphs dropped between them (and the decode slot rebuilt before timing);
a figure is the median over rounds, the first call's the last round's (the first round's may include compiling).

Schemes: "package" (`prompt_graphs.PROMPT_BUCKETS` as shipped: 128 apart from 1,024 to 2,048 tokens since session 20),
"256 apart 1K-2K" (as shipped before) and "64 apart 1K-2K" (prompts of 1,024-2,048 tokens laid into lengths that many
tokens apart; the rest as shipped). Session 20's results (`results/h200_prompt_buckets.*`) ran before the change:
there "package" is 256 apart and "128 apart 1K-2K" what ships now.

    python benchmarks/prompt_buckets.py --lengths 1053 1150 1290 --rounds 2 --out benchmarks/results
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
from bench import build_infinitevl, environment, log  # noqa: E402
from module_path_ab import patched  # noqa: E402
from prompt_latency import replay_timer  # noqa: E402


def scheme(step: int | None):
    """The shipped prompt lengths, with those from 1,024 to 2,048 tokens `step` apart (None: as shipped)."""
    from infinitevl_hf.speed import prompt_graphs

    if step is None:
        return contextlib.nullcontext()
    shipped = prompt_graphs.PROMPT_BUCKETS
    buckets = (*(b for b in shipped if b < 1024), *range(1024, 2048, step), *(b for b in shipped if b >= 2048))
    return patched(prompt_graphs, "PROMPT_BUCKETS", buckets)


SCHEMES = {"package": None, "256 apart 1K-2K": 256, "64 apart 1K-2K": 64}


def measure(model, length: int, steady: int) -> dict:
    from infinitevl_hf.speed import prompt_graphs
    from infinitevl_hf.speed.decode_graphs import decode_graphs_of

    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(0, 1000, (1, length), generator=generator).cuda()
    mask = torch.ones_like(ids)

    def call():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False)

    torch.cuda.synchronize()
    reserved, captures = torch.cuda.memory_reserved(), decode_graphs_of(model).captures
    start = time.perf_counter()
    call()
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    captured = decode_graphs_of(model).captures > captures
    kept = torch.cuda.memory_reserved() - reserved
    runs, replays = [], []
    for _ in range(steady):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with replay_timer(replays):
            call()
        torch.cuda.synchronize()
        runs.append(time.perf_counter() - start)
    return {"bucket": prompt_graphs.prompt_bucket(length, 8192), "captured": captured,
            "first_call_s": first if captured else None, "ttft_s": statistics.median(runs),
            "replay_gpu_ms": statistics.median(a.elapsed_time(b) for _, a, b in replays),
            "reserved_added_mb": kept / 2**20 if captured else None}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1053, 1150, 1290])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steady", type=int, default=7)
    parser.add_argument("--schemes", nargs="+", choices=list(SCHEMES), default=list(SCHEMES))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--name", default="h200_prompt_buckets")
    args = parser.parse_args(argv)

    from infinitevl_hf.speed.decode_graphs import decode_graphs_of

    model = build_infinitevl()
    short = torch.ones(1, 64, dtype=torch.long, device="cuda")
    with torch.no_grad():
        model.generate(input_ids=short, max_new_tokens=2)  # warm up
        runs = {f"{length} {name}": [] for length in args.lengths for name in args.schemes}
        for round_ in range(args.rounds):
            for name in args.schemes:
                with scheme(SCHEMES[name]):
                    decode_graphs_of(model).clear()  # each scheme captures its own prompts
                    torch.cuda.empty_cache()
                    model.generate(input_ids=short, max_new_tokens=2)  # the slot's static cache, apart from the timing
                    for length in args.lengths:
                        result = measure(model, length, args.steady)
                        runs[f"{length} {name}"].append(result)
                        log(f"round {round_ + 1} {length} tokens, {name}: {json.dumps(result)}")
    summary = {key: {"bucket": results[0]["bucket"],
                     **{k: statistics.median(r[k] for r in results) for k in ("ttft_s", "replay_gpu_ms")},
                     "first_call_s": results[-1]["first_call_s"], "reserved_added_mb": results[-1]["reserved_added_mb"]}
               for key, results in runs.items()}
    lines = ["| prompt tokens | scheme | bucket | TTFT ms | replay GPU ms | first call s | graph MB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for key, value in summary.items():
        length, name = key.split(" ", 1)
        first, kept = value["first_call_s"], value["reserved_added_mb"]
        lines.append(f"| {length} | {name} | {value['bucket']} | {1e3 * value['ttft_s']:.1f} | "
                     f"{value['replay_gpu_ms']:.2f} | {'-' if first is None else f'{first:.2f}'} | "
                     f"{'-' if kept is None else f'{kept:.0f}'} |")
    log("\n" + "\n".join(lines))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {"environment": environment(), "rounds": args.rounds, "steady": args.steady, "summary": summary,
                  "runs": runs}
        (args.out / f"{args.name}.json").write_text(json.dumps(record, indent=2))
        (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
