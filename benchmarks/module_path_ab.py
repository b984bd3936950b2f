"""The module path's decode (`generate(disable_compile=True)`, the photo case) with and without its host-side
savings, alternated in one process: the module path's speed is host-bound, and host speed differs between
processes and machines by up to 2x, so only a same-process alternation tells the variants apart.

Variants (each switches one saving off; "none" switches them all off):
- "package": as the package runs;
- "Triton's launch": every package kernel launched through `kernel[grid]` (no direct launch, `ops.triton_launch`);
- "cuBLAS products": one-row products through `F.linear` and the MLP's gate as its own kernel, not the
  matrix-vector kernel, and the MLP's residual a torch add (`joined_linear._one_token_product`);
- "separate conv and rule": a Gated DeltaNet's three convolutions one op each (outside its projection), and its
  gates a kernel of their own before the one-token rule (`causal_conv1d_group`, `gated_delta_rule_decode_step`);
- "separate projections": each input projection its own `nn.Linear` call (`joined_linear.joined_weight`);
- "convolutions apart": a Gated DeltaNet's convolutions an op of their own after its joined projection, not inside
  it (`joined_linear.project_convolved`);
- "residual apart": the MLP's residual a torch add after its down product, not inside it (`InfiniteVLMLP.add_to`);
- "norms apart": a layer's input norm and its post-attention add and norm ops of their own, not inside the
  products after them (`joined_linear.norm_parameters`);
- "empty hook chains handed over": Triton's empty launch-hook chains handed to every launch with its metadata
  built, as `kernel[grid]` does (`ops.triton_launch`);
- "matvec launches prepared per call": the matrix-vector kernels' flags, tile and keyword signature (the fused
  kernel's and the gated norm's) built on every call, not kept per shape (`ops.matvec.triton_matvec._PREPARED`);
- "gated norm apart": a Gated DeltaNet's output norm an op of its own before its output projection, not in the
  product's prologue (`joined_linear.apply_gated_norm_linear`).

    python benchmarks/module_path_ab.py --rounds 3 --new-tokens 48 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import build_infinitevl, environment, log  # noqa: E402
from generate_bench import PHOTO, bench_processor, case_inputs, measure, use_tokenizer_ids  # noqa: E402


@contextlib.contextmanager
def patched(module, name: str, value):
    kept = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, kept)


def tritons_launch():
    from infinitevl_hf.modeling.ops import triton_launch

    return patched(triton_launch, "_DIRECT", False)


def cublas_products():
    import torch.nn.functional as F

    from infinitevl_hf.modeling import joined_linear
    from infinitevl_hf.modeling.ops.elementwise import silu_glu

    def product(x, weight, bias, glu=False, residual=None, in_place=False):
        y = F.linear(x, weight, bias)
        y = silu_glu(y) if glu else y
        return y if residual is None else residual + y

    return patched(joined_linear, "_one_token_product", product)


@contextlib.contextmanager
def separate_conv_and_rule():
    from infinitevl_hf.modeling import gated_deltanet
    from infinitevl_hf.modeling.ops import causal_conv1d, fused_recurrent_gated_delta_rule
    from infinitevl_hf.modeling.ops.gated_delta_rule import gdn_gates

    def convs(xs, weights, biases, activation, states, output_final_state, cu_seqlens, *, state_in_place):
        pairs = [causal_conv1d(x, w, b, activation, s, output_final_state, cu_seqlens, state_in_place=state_in_place)
                 for x, w, b, s in zip(xs, weights, biases, states)]
        return tuple(y for y, _ in pairs), tuple(f for _, f in pairs)

    def rule(q, k, v, a, b, A_log, dt_bias, state):
        batch, heads, d_k, d_v = state.shape
        g, beta = gdn_gates(a.view(batch, 1, -1), b.view(batch, 1, -1), A_log, dt_bias)
        o, _ = fused_recurrent_gated_delta_rule(
            q.view(batch, 1, heads, d_k), k.view(batch, 1, heads, d_k), v.view(batch, 1, heads, d_v), g=g, beta=beta,
            initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True, state_in_place=True)
        return o.view(batch, -1)

    with patched(gated_deltanet, "causal_conv1d_group", convs), \
            patched(gated_deltanet, "gated_delta_rule_decode_step", rule), convolutions_apart():
        yield


def separate_projections():
    from infinitevl_hf.modeling import joined_linear

    return patched(joined_linear, "joined_weight", lambda linears: None)


def convolutions_apart():
    from infinitevl_hf.modeling import gated_deltanet

    return patched(gated_deltanet, "project_convolved", lambda *args, **kwargs: None)


def residual_apart():
    from infinitevl_hf.modeling.mlp import InfiniteVLMLP

    return patched(InfiniteVLMLP, "add_to", lambda self, residual, x, in_place=False: residual + self(x))


@contextlib.contextmanager
def norms_apart():
    from infinitevl_hf.modeling import joined_linear, mlp

    with patched(joined_linear, "norm_parameters", lambda norm: None), patched(mlp, "norm_parameters", lambda norm: None):
        yield


def empty_hook_chains_handed_over():
    from infinitevl_hf.modeling.ops import triton_launch

    return patched(triton_launch, "_hooked", lambda hook: hook is not None)


class _Forgetful(dict):
    def __setitem__(self, key, value):
        pass


def matvec_launches_prepared_per_call():
    from infinitevl_hf.modeling.ops.matvec import triton_matvec

    return patched(triton_matvec, "_PREPARED", _Forgetful())


def gated_norm_apart():
    from infinitevl_hf.modeling import gated_deltanet

    return patched(gated_deltanet, "apply_gated_norm_linear", lambda *args: None)


@contextlib.contextmanager
def none():
    with tritons_launch(), cublas_products(), separate_conv_and_rule(), separate_projections(), \
            convolutions_apart(), residual_apart(), norms_apart(), empty_hook_chains_handed_over(), gated_norm_apart(), \
            matvec_launches_prepared_per_call():
        yield


VARIANTS = {"package": contextlib.nullcontext, "Triton's launch": tritons_launch, "cuBLAS products": cublas_products,
            "separate conv and rule": separate_conv_and_rule, "separate projections": separate_projections,
            "convolutions apart": convolutions_apart, "residual apart": residual_apart, "norms apart": norms_apart,
            "empty hook chains handed over": empty_hook_chains_handed_over, "gated norm apart": gated_norm_apart,
            "matvec launches prepared per call": matvec_launches_prepared_per_call,
            "none": none}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--name", default="h200_module_path_ab", help="the results file's name, without .json")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args(argv)

    processor = bench_processor(PHOTO[0] * PHOTO[1])
    model = build_infinitevl()
    use_tokenizer_ids(model.config, processor.tokenizer)
    inputs = case_inputs(processor, "photo")
    runs: dict[str, list[dict]] = {name: [] for name in args.variants}
    for round_ in range(args.rounds):
        for name in args.variants:
            with VARIANTS[name]():
                result = measure(model, inputs, args.new_tokens, 1, disable_compile=True)
            runs[name].append(result)
            log(f"round {round_ + 1} {name}: {result['decode_ms_per_token']:.2f} ms/token")
    summary = {name: statistics.median(r["decode_ms_per_token"] for r in results) for name, results in runs.items()}
    base = summary.get("none")
    for name, ms in summary.items():
        ratio = f", {base / ms:.2f}x the path without the savings" if base else ""
        log(f"{name}: {ms:.2f} ms/token (median of {args.rounds}){ratio}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {"environment": environment(), "new_tokens": args.new_tokens, "rounds": args.rounds,
                  "variants": args.variants,
                  "median_decode_ms_per_token": summary, "runs": runs}
        (args.out / f"{args.name}.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
