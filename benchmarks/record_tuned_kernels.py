"""Record the autotuning choices fla's kernels make for the 4B model on this GPU into the package
(`src/infinitevl_hf/modeling/ops/tuned/<gpu>.json`), so that a machine with an empty Triton cache skips them.

Runs what users run with autotuning on (seeding off, so every choice is this machine's own): `generate()` on a
photo, a page, a 1K-token text prompt and 8 batched photos; text batches of 1, 2, 4 and 8 rows (`warmup`); the
module path (`disable_compile=True`); and a few streamed frames. Then writes every choice the autotuners hold.

    INFINITEVL_TUNED_KERNELS=0 python benchmarks/record_tuned_kernels.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import build_infinitevl, streaming  # noqa: E402
from generate_bench import PAGE, bench_processor, case_inputs, use_tokenizer_ids  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None, help="also copy the recording here")
    args = parser.parse_args(argv)
    from infinitevl_hf.modeling.compat import CACHE_KWARG
    from infinitevl_hf.modeling.ops import tuned

    if tuned.seeding_problem() is None:
        raise SystemExit(f"set {tuned.SWITCH_ENV}=0: a recording must hold this machine's own choices")
    started = time.perf_counter()
    processor = bench_processor(PAGE[0] * PAGE[1])
    model = build_infinitevl()
    use_tokenizer_ids(model.config, processor.tokenizer)
    for case in ("photo", "page", "text_1k", "photo_x8"):
        inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in case_inputs(processor, case).items()}
        model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        if case == "photo":
            model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, disable_compile=True)
        print(f"{case}: {time.perf_counter() - started:.1f} s", flush=True)
    model.warmup(batch_sizes=(1, 2, 4, 8), prompt_tokens=300)
    streaming(model, frames=4, cache_kwarg=CACHE_KWARG)
    streaming(model, frames=4, cache_kwarg=CACHE_KWARG, graph=True)
    torch.cuda.synchronize()
    gpu = torch.cuda.get_device_name()
    path = tuned.record(gpu)
    recording = json.loads(path.read_text())
    counts = {name: len(entries) for name, entries in recording["kernels"].items()}
    print(f"{sum(counts.values())} choices of {len(counts)} kernels on {gpu} in {time.perf_counter() - started:.1f} s "
          f"-> {path}", json.dumps(counts, indent=1), sep="\n")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, args.out / path.name)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
