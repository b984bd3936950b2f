"""What users run, timed end to end: `generate()` (and `pipeline()`) of InfiniteVL-4B beside its Qwen2.5-VL-3B
teacher, random bf16 weights of the released configs, one process, one GPU, the same processed inputs.

Cases: (a) a 448x448 photo + 32-token question, (b) a 1344x1792 page + question, (c) a 1,024-token text prompt,
(d) 8 photo requests in one left-padded batch; `--new-tokens` (128) new tokens each, min = max. Per case and
model: time to first token (`max_new_tokens=1`), the whole answer, new tokens/s and decode ms/token
((answer - first token) / (new tokens - 1)); the first call of the process apart from the median of the steady
calls. InfiniteVL: its default `generate()` (captured graph) and `disable_compile=True` (module path);
teacher: its dynamic cache and `cache_implementation="static"` (compiled by transformers).

    python benchmarks/generate_bench.py --out benchmarks/results
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
from bench import build_infinitevl, build_teacher, environment, log, timed  # noqa: E402

PHOTO, PAGE = (448, 448), (1792, 1344)  # (height, width)


def bench_processor(pixels: int):
    """The package's processor with an offline tokenizer (the Qwen2.5-VL special tokens and chat template) and
    the Qwen2-VL image processor sized so that an image of `pixels` keeps its size."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from infinitevl_hf.processing import InfiniteVLProcessor
    from infinitevl_hf.tiny import chat_template, tiny_tokenizer

    image_processor = Qwen2VLImageProcessorPil(min_pixels=448 * 448, max_pixels=pixels, patch_size=14, merge_size=2,
                                               temporal_patch_size=2)
    return InfiniteVLProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer(), chat_template=chat_template())


def use_tokenizer_ids(config, tokenizer) -> None:
    """Point a model config's vision token ids at the bench tokenizer's (speed does not depend on which ids)."""
    for field, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                         ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
        setattr(config, field, tokenizer.convert_tokens_to_ids(token))


def image(size, seed: int):
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (*size, 3), generator=generator, dtype=torch.uint8).numpy()
    return Image.fromarray(pixels)


def question(tokenizer, tokens: int, seed: int) -> str:
    """A text of exactly `tokens` tokens of the bench tokenizer."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 400, (tokens,), generator=generator).tolist()
    text = tokenizer.decode(ids)
    while len(tokenizer(text)["input_ids"]) > tokens:
        text = text[:-1]
    return text


def messages(img, text: str) -> list:
    content = ([{"type": "image", "image": img}] if img is not None else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def case_inputs(processor, name: str) -> dict:
    tok = processor.tokenizer
    if name == "photo":
        batch = [messages(image(PHOTO, 0), question(tok, 32, 0))]
    elif name == "page":
        batch = [messages(image(PAGE, 1), question(tok, 32, 1))]
    elif name == "text_1k":
        batch = [messages(None, question(tok, 1024, 2))]
    elif name == "photo_x8":
        batch = [messages(image(PHOTO, 10 + i), question(tok, 16 + 4 * i, 10 + i)) for i in range(8)]
    else:
        raise ValueError(name)
    return processor.apply_chat_template(batch, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt", padding=True)



def on_cuda(inputs: dict) -> dict:
    return {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def greedy_seconds(model, inputs: dict, new_tokens: int, **flags) -> float:
    """Seconds of one greedy `generate()` of exactly `new_tokens` new tokens (min = max)."""
    return timed(lambda: model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                        do_sample=False, **flags))


def decode_ms(first_token_s: float, answer_s: float, new_tokens: int) -> float:
    """ms a decoded token: the answer less its first token, over the tokens after the first."""
    return 1e3 * (answer_s - first_token_s) / (new_tokens - 1)


def measure(model, inputs: dict, new_tokens: int, steady: int, **flags) -> dict:
    inputs = on_cuda(inputs)
    rows = inputs["input_ids"].shape[0]

    def run(n):
        return greedy_seconds(model, inputs, n, **flags)

    with torch.no_grad():
        first_answer = run(new_tokens)  # the first call of this shape: compiles/captures what it needs
        first_token = [run(1) for _ in range(steady)]
        answer = [run(new_tokens) for _ in range(steady)]
    ttft, full = statistics.median(first_token), statistics.median(answer)
    return {
        "first_call_s": first_answer,
        "ttft_s": ttft,
        "answer_s": full,
        "answer_runs_s": answer,
        "new_tokens_per_s": rows * new_tokens / full,
        "decode_ms_per_token": decode_ms(ttft, full, new_tokens),
        "rows": rows,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
    }


def measure_pipeline(model, processor, new_tokens: int, steady: int) -> dict:
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    chat = messages(image(PHOTO, 0), question(processor.tokenizer, 32, 0))

    def run():
        return timed(lambda: pipe(text=chat, max_new_tokens=new_tokens,
                                  generate_kwargs={"min_new_tokens": new_tokens, "do_sample": False}))

    first = run()
    runs = [run() for _ in range(steady)]
    return {"first_call_s": first, "answer_s": statistics.median(runs), "answer_runs_s": runs}


@contextlib.contextmanager
def transformers_loop():
    """generate() decodes through transformers' own sampling loop, which waits for the GPU after every token,
    instead of the package's (`speed.sampling_loop`): the side-by-side of the two loops."""
    from infinitevl_hf.modeling import modeling_infinitevl

    ahead = modeling_infinitevl.samples_ahead
    modeling_infinitevl.samples_ahead = lambda *args, **kwargs: False
    try:
        yield
    finally:
        modeling_infinitevl.samples_ahead = ahead


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="h200_generate")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--steady", type=int, default=3)
    parser.add_argument("--teacher-steady", type=int, default=1)
    parser.add_argument("--cases", nargs="+", default=["photo", "page", "text_1k", "photo_x8"])
    parser.add_argument("--skip-teacher", action="store_true")
    parser.add_argument("--skip-module-path", action="store_true", help="skip disable_compile=True and pipeline()")
    parser.add_argument("--compare-loop", nargs="*", default=[],
                        help="cases to time again through transformers' own decoding loop (the host waits for the GPU "
                             "after every token), in the same process, beside the default loop")
    parser.add_argument("--host-rounds", type=int, default=3,
                        help="rounds alternating the module path with the teacher's dynamic cache on the photo, after "
                             "everything else (0: none)")
    parser.add_argument("--teacher-cases", nargs="+", default=None,
                        help="cases to time the teacher on (default: all of --cases)")
    args = parser.parse_args(argv)

    results = {"environment": environment(), "new_tokens": args.new_tokens, "infinitevl": {}, "teacher": {}}
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every measurement, so that a run cut short keeps what it measured
        (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=2))
        (args.out / f"{args.name}.md").write_text(markdown(results, args.cases))

    processor = bench_processor(PAGE[0] * PAGE[1])
    inputs = {name: case_inputs(processor, name) for name in args.cases}

    start = time.perf_counter()
    model = build_infinitevl()
    use_tokenizer_ids(model.config, processor.tokenizer)
    results["infinitevl"]["build_s"] = time.perf_counter() - start
    for name in args.cases:
        log("infinitevl", name)
        results["infinitevl"][name] = measure(model, inputs[name], args.new_tokens, args.steady)
        log(json.dumps(results["infinitevl"][name]))
        save()
    for name in args.compare_loop:
        log("infinitevl", name, "through transformers' loop")
        with transformers_loop():
            results["infinitevl"][f"{name}_transformers_loop"] = measure(model, inputs[name], args.new_tokens, args.steady)
        log(json.dumps(results["infinitevl"][f"{name}_transformers_loop"]))
        save()
    if not args.skip_module_path:
        log("infinitevl module path (disable_compile=True)")
        results["infinitevl"]["photo_module_path"] = measure(model, inputs["photo"], args.new_tokens, args.steady,
                                                             disable_compile=True)
        log(json.dumps(results["infinitevl"]["photo_module_path"]))
        log("infinitevl pipeline")
        results["infinitevl"]["photo_pipeline"] = measure_pipeline(model, processor, args.new_tokens, args.steady)
        log(json.dumps(results["infinitevl"]["photo_pipeline"]))
    host_rounds = args.host_rounds and not args.skip_teacher and not args.skip_module_path and "photo" in args.cases
    if not host_rounds:  # (else both models stay: 4B + 3B in bf16 leave most of the card free)
        del model
        torch.cuda.empty_cache()

    if not args.skip_teacher:
        teacher = build_teacher()
        use_tokenizer_ids(teacher.config, processor.tokenizer)
        for name in args.teacher_cases or args.cases:
            for label, flags in (("dynamic", {}), ("static", {"cache_implementation": "static"})):
                log("teacher", label, name)
                try:
                    results["teacher"][f"{name}_{label}"] = measure(teacher, inputs[name], args.new_tokens,
                                                                    args.teacher_steady, **flags)
                except Exception as error:  # a teacher mode that cannot run a case is reported, not fatal
                    results["teacher"][f"{name}_{label}"] = {"error": f"{type(error).__name__}: {error}"[:500]}
                log(json.dumps(results["teacher"][f"{name}_{label}"]))
                save()

    if host_rounds:
        log("host rounds: the module path and the teacher's dynamic cache alternated, photo")
        results["host_rounds"] = module_path_rounds(model, teacher, inputs["photo"], args.new_tokens, args.host_rounds)
        log(json.dumps(results["host_rounds"]))
    save()
    print(markdown(results, args.cases))


def module_path_rounds(model, teacher, inputs: dict, new_tokens: int, rounds: int) -> dict:
    """Decode ms/token of InfiniteVL's module path (`disable_compile=True`) and of the teacher's eager dynamic
    cache, alternated call by call: both are host-bound, so the teacher's figure beside each of ours says how
    fast the host was at that moment (the host's speed moves between machines and within a run)."""
    inputs = on_cuda(inputs)
    ours, theirs = [], []
    with torch.no_grad():
        for _ in range(rounds):
            for model_, runs, flags in ((model, ours, {"disable_compile": True}), (teacher, theirs, {})):
                ttft = greedy_seconds(model_, inputs, 1, **flags)
                runs.append(decode_ms(ttft, greedy_seconds(model_, inputs, new_tokens, **flags), new_tokens))
    ratios = [a / b for a, b in zip(ours, theirs)]
    return {"module_path_decode_ms": ours, "teacher_dynamic_decode_ms": theirs, "ratios": ratios,
            "module_path_median_ms": statistics.median(ours), "teacher_dynamic_median_ms": statistics.median(theirs),
            "ratio_median": statistics.median(ratios)}


def markdown(results: dict, cases) -> str:
    env = results["environment"]
    lines = [f"# generate() end to end ({env.get('gpu')}, torch {env.get('torch')}, transformers {env.get('transformers')})",
             "", f"{results['new_tokens']} new tokens, greedy; steady = median of the steady calls.", "",
             "| case | model | first call s | TTFT s | answer s | new tok/s | decode ms/tok |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    rows = [(c, "InfiniteVL generate()", results["infinitevl"].get(c)) for c in cases]
    rows += [(c, "InfiniteVL generate(), transformers' loop", results["infinitevl"].get(f"{c}_transformers_loop"))
             for c in cases]
    rows.append(("photo", "InfiniteVL disable_compile=True", results["infinitevl"].get("photo_module_path")))
    for c in cases:
        rows += [(c, "teacher dynamic", results["teacher"].get(f"{c}_dynamic")),
                 (c, "teacher static compiled", results["teacher"].get(f"{c}_static"))]
    for case, label, r in rows:
        if not r:
            continue
        if "error" in r:
            lines.append(f"| {case} | {label} | {r['error'][:80]} | | | | |")
            continue
        lines.append(f"| {case} | {label} | {r['first_call_s']:.2f} | {r['ttft_s']:.3f} | {r['answer_s']:.3f} | "
                     f"{r['new_tokens_per_s']:.0f} | {r['decode_ms_per_token']:.2f} |")
    p = results["infinitevl"].get("photo_pipeline")
    if p:
        lines += ["", f"pipeline('image-text-to-text'), photo: first call {p['first_call_s']:.2f} s, steady {p['answer_s']:.3f} s."]
    h = results.get("host_rounds")
    if h:
        pairs = ", ".join(f"{a:.1f}/{b:.1f}"
                          for a, b in zip(h["module_path_decode_ms"], h["teacher_dynamic_decode_ms"]))
        lines += ["", f"Module path / teacher dynamic decode ms/token, alternated call by call (photo): {pairs}; "
                      f"medians {h['module_path_median_ms']:.1f} / {h['teacher_dynamic_median_ms']:.1f} ms "
                      f"(ratio {h['ratio_median']:.2f})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
