"""`generate()` of a quantized InfiniteVL-4B beside the bf16 one, end to end, in one process on one GPU.

Random bf16 weights of the released config are saved once and loaded back the way a user loads them:
`from_pretrained(folder, dtype=bfloat16, device_map="cuda")`, and the same with `quantization_config=` (torchao
int8 weight-only; bitsandbytes 8-bit and 4-bit where bitsandbytes is installed). The compiled decode step reads
plain weights, so a quantized model decodes another way (torchao: its module path captured in a CUDA graph;
bitsandbytes: the module path); what `generate()` logs about it is recorded, and quantized models are also timed
with `disable_compile=True` (the module path as it is). Per model: the photo case of `generate_bench.py`
(448x448 photo + 32-token question, 128 new tokens): first call, time to first token, the answer (median of the
steady calls), decode ms/token, weight memory, and how many greedy tokens equal the bf16 model's.

    python benchmarks/quantized_generate.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import build_infinitevl, environment, log  # noqa: E402
from generate_bench import PAGE, bench_processor, case_inputs, measure, use_tokenizer_ids  # noqa: E402


class _Reasons(logging.Handler):
    """Collects what InfiniteVL's generate() says about its decode path."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("InfiniteVL generate()"):  # the decode path, when it is not the compiled graph
            self.messages.append(message)


def quantization_configs() -> dict:
    from transformers import TorchAoConfig

    configs = {}
    try:
        from torchao.quantization import Int8WeightOnlyConfig

        # version 2 (`Int8Tensor`), the default from torchao 0.18: with torchao 0.17's default (version 1,
        # `AffineQuantizedTensor`) transformers 5.24's from_pretrained failed on an H200 (`aten.new_zeros`)
        configs["torchao_int8_weight_only"] = TorchAoConfig(Int8WeightOnlyConfig(version=2))
    except Exception as error:  # reported, not fatal: the other configs still run
        configs["torchao_int8_weight_only"] = f"{type(error).__name__}: {error}"
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig

        configs["bnb_8bit"] = BitsAndBytesConfig(load_in_8bit=True)
        configs["bnb_4bit_nf4"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                     bnb_4bit_compute_dtype=torch.bfloat16)
    except ImportError:
        configs["bitsandbytes"] = "not installed here"
    return configs


def run_one(folder: str, inputs: dict, new_tokens: int, steady: int, reference: list | None, **load) -> dict:
    from infinitevl_hf import InfiniteVLForConditionalGeneration

    handler = _Reasons()
    logger = logging.getLogger("infinitevl_hf")
    logger.addHandler(handler)
    try:
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        model = InfiniteVLForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda",
                                                                   **load).eval()
        result = {"weights_gib": (torch.cuda.memory_allocated() - before) / 2**30}
        result.update(measure(model, inputs, new_tokens, steady))
        result["decode_path_messages"] = sorted(set(handler.messages))  # the default path's, before disable_compile
        if reference is not None:  # the module path uncaptured, beside what generate() does by default
            result["module_path"] = measure(model, inputs, new_tokens, 1, disable_compile=True)
        with torch.no_grad():
            cuda_inputs = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            out = model.generate(**cuda_inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
        result["tokens"] = tokens
        if reference is not None:
            same = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(tokens))
            result["tokens_equal_to_bf16_before_first_difference"] = same
        del model
        return result
    finally:
        logger.removeHandler(handler)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="h200_quantized_generate")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--steady", type=int, default=3)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    processor = bench_processor(PAGE[0] * PAGE[1])
    inputs = case_inputs(processor, "photo")
    results = {"environment": environment(), "case": "photo", "new_tokens": args.new_tokens, "models": {}}

    def save() -> None:
        (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=2))
        (args.out / f"{args.name}.md").write_text(markdown(results))

    with tempfile.TemporaryDirectory() as folder:
        model = build_infinitevl()
        use_tokenizer_ids(model.config, processor.tokenizer)
        model.save_pretrained(folder)
        del model
        torch.cuda.empty_cache()
        log("bf16")
        results["models"]["bf16"] = run_one(folder, inputs, args.new_tokens, args.steady, None)
        save()
        reference = results["models"]["bf16"]["tokens"]
        for name, config in quantization_configs().items():
            log(name)
            if isinstance(config, str):
                results["models"][name] = {"error": config}
                continue
            try:
                results["models"][name] = run_one(folder, inputs, args.new_tokens, args.steady, reference,
                                                  quantization_config=config)
            except Exception as error:  # one backend failing is a result, not the end of the run
                results["models"][name] = {"error": f"{type(error).__name__}: {error}"[:500]}
            log(json.dumps({k: v for k, v in results["models"][name].items() if k != "tokens"}))
            save()
    save()
    print(markdown(results))


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"# Quantized generate() ({env.get('gpu')}, torch {env.get('torch')}, transformers {env.get('transformers')})",
             "", f"Photo + 32-token question, {results['new_tokens']} new tokens, greedy, batch 1; steady = median.", "",
             "| weights | weight GiB | first call s | TTFT s | answer s | decode ms/tok | tokens = bf16 | decode path |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results["models"].items():
        if "error" in r:
            lines.append(f"| {name} | - | - | - | - | - | - | not run: {r['error'][:120]} |")
            continue
        path = "; ".join(r["decode_path_messages"]) or "captured graph"
        same = r.get("tokens_equal_to_bf16_before_first_difference", "-")
        lines.append(f"| {name} | {r['weights_gib']:.2f} | {r['first_call_s']:.2f} | {r['ttft_s']:.3f} | "
                     f"{r['answer_s']:.3f} | {r['decode_ms_per_token']:.2f} | {same} | {path} |")
        m = r.get("module_path")
        if m:
            lines.append(f"| {name}, disable_compile=True | - | {m['first_call_s']:.2f} | {m['ttft_s']:.3f} | "
                         f"{m['answer_s']:.3f} | {m['decode_ms_per_token']:.2f} | - | the module path, uncaptured |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
