"""The module path's decode (`generate(disable_compile=True)`, the photo case) with and without its host-side
savings, alternated in one process: the module path's speed is host-bound, and host speed differs between
processes and machines by up to 2x, so only a same-process alternation tells the variants apart.

Variants: "joined + in place" (the package: each layer's input projections one product, the states written
in place), "in place" (each projection its own `nn.Linear` call), "per-module, copied" (also the states written
to new tensors and copied into the cache, as before).

    python benchmarks/module_path_ab.py --rounds 3 --new-tokens 48 --out benchmarks/results
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
from generate_bench import PHOTO, bench_processor, case_inputs, measure, use_tokenizer_ids  # noqa: E402


@contextlib.contextmanager
def separate_projections():
    from infinitevl_hf.modeling import joined_linear

    joined = joined_linear.joined_weight
    joined_linear.joined_weight = lambda linears: None
    try:
        yield
    finally:
        joined_linear.joined_weight = joined


@contextlib.contextmanager
def copied_states():
    """The conv and delta rule return new states, which the cache copies in (`state_in_place` off)."""
    from infinitevl_hf.modeling import gated_deltanet

    conv_forward, rule = gated_deltanet.InfiniteVLShortConvolution.forward, gated_deltanet.fused_recurrent_gated_delta_rule

    def conv(self, x, state=None, output_final_state=False, cu_seqlens=None, state_in_place=False):
        return conv_forward(self, x, state, output_final_state, cu_seqlens)

    def recurrent(*args, state_in_place=False, **kwargs):
        return rule(*args, **kwargs)

    gated_deltanet.InfiniteVLShortConvolution.forward, gated_deltanet.fused_recurrent_gated_delta_rule = conv, recurrent
    try:
        yield
    finally:
        gated_deltanet.InfiniteVLShortConvolution.forward, gated_deltanet.fused_recurrent_gated_delta_rule = conv_forward, rule


@contextlib.contextmanager
def per_module_copied():
    with separate_projections(), copied_states():
        yield


VARIANTS = {"joined + in place": contextlib.nullcontext, "in place": separate_projections,
            "per-module, copied": per_module_copied}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    processor = bench_processor(PHOTO[0] * PHOTO[1])
    model = build_infinitevl()
    use_tokenizer_ids(model.config, processor.tokenizer)
    inputs = case_inputs(processor, "photo")
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for round_ in range(args.rounds):
        for name in VARIANTS:
            with VARIANTS[name]():
                result = measure(model, inputs, args.new_tokens, 1, disable_compile=True)
            runs[name].append(result)
            log(f"round {round_ + 1} {name}: {result['decode_ms_per_token']:.2f} ms/token")
    summary = {name: statistics.median(r["decode_ms_per_token"] for r in results) for name, results in runs.items()}
    base = summary["per-module, copied"]
    for name, ms in summary.items():
        log(f"{name}: {ms:.2f} ms/token (median of {args.rounds}), {base / ms:.2f}x the per-module, copied path")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {"environment": environment(), "new_tokens": args.new_tokens, "rounds": args.rounds,
                  "median_decode_ms_per_token": summary, "runs": runs}
        (args.out / "h200_module_path_ab.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
