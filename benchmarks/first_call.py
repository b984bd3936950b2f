"""The first `generate()` of a fresh process (a photo + question, 128 new tokens), by phase: model build, the
call itself (kernel autotuning, compilation, graph capture), and a second call. Run it twice in a row to see
what the on-disk caches of Triton, inductor and fla's autotuning save a later process.

    python benchmarks/first_call.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import build_infinitevl  # noqa: E402
from generate_bench import PAGE, bench_processor, case_inputs, use_tokenizer_ids  # noqa: E402


def main() -> None:
    started = time.perf_counter()
    processor = bench_processor(PAGE[0] * PAGE[1])
    model = build_infinitevl()
    use_tokenizer_ids(model.config, processor.tokenizer)
    torch.cuda.synchronize()
    built = time.perf_counter()
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in case_inputs(processor, "photo").items()}
    times = {"build_s": built - started}
    for label in ("first_generate_s", "second_generate_s"):
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=128, min_new_tokens=128, do_sample=False)
        torch.cuda.synchronize()
        times[label] = time.perf_counter() - start
    print(json.dumps(times))


if __name__ == "__main__":
    main()
