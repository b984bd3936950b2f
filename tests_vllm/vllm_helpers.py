"""The tiny checkpoint the vLLM tests serve, and its fp32 reference (this package's transformers model)."""

from __future__ import annotations

from pathlib import Path

import torch

import infinitevl_hf
from infinitevl_hf.tiny import asset_path

# Head sizes vLLM's CPU kernels accept (attention 32, Gated DeltaNet d_k 64 / d_v 128), both layer kinds,
# a 32-token window (the prompts span several), and weights 5x the default scale so that the Gated DeltaNet
# state and the window visibly change the logits (`test_reference_is_sensitive`).
VLLM_TINY = dict(
    hidden_size=64,
    num_attention_heads=2,
    num_key_value_heads=1,
    rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1000000.0},
    linear_head_dim=64,
    expand_v=2,
    num_linear_heads=2,
    num_linear_key_value_heads=2,
    sliding_window=32,
    initializer_range=0.1,
)
WINDOW = VLLM_TINY["sliding_window"]
# One engine per test session (bf16: the CPU Gated DeltaNet kernels' dtype); no prefix caching, so a prompt in
# a batch and alone are computed the same way.
ENGINE_ARGS = dict(
    dtype="bfloat16",
    enforce_eager=True,
    max_model_len=1024,
    max_num_seqs=4,
    seed=0,
    enable_prefix_caching=False,
    limit_mm_per_prompt={"image": 1, "video": 1},
)
# Teacher-forced log-probabilities of vLLM (bf16, the CPU kernels' dtype) against the fp32 reference. The
# reference's own bf16 run is off by about as much (measured: vLLM max 0.058 / mean 0.014 on text, 0.078 /
# 0.014 with an image; transformers bf16 0.065 / 0.014 with the image).
LOGPROB_MAX_ERROR = 0.15
LOGPROB_MEAN_ERROR = 0.03
# Greedy tokens and top-1 are compared where the fp32 reference's top-2 margin is at least this.
CLEAR_MARGIN = 0.2


def write_checkpoint(path: Path, **overrides) -> Path:
    return infinitevl_hf.tiny_checkpoint(path, **{**VLLM_TINY, **overrides})


def corpus_text(chars: int) -> str:
    return asset_path("tiny_corpus.txt").read_text(encoding="utf-8")[:chars]


def demo_image():
    from PIL import Image

    return Image.open(asset_path("demo.png")).convert("RGB")


def chat_prompt(processor, text: str, image: bool) -> str:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)


def reference_logprobs(model, processor, prompt: str, image=None, continuation=()) -> tuple[list[int], torch.Tensor]:
    """(token ids of the prompt + `continuation`, fp32 log-probabilities [T, vocab] of the token after each)."""
    inputs = processor(text=[prompt], images=[image] if image is not None else None, return_tensors="pt")
    if continuation:
        extra = torch.tensor([list(continuation)])
        inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
    return inputs["input_ids"][0].tolist(), logits.log_softmax(-1)


def compare_prompt_logprobs(ids: list[int], reference: torch.Tensor, prompt_logprobs) -> dict:
    """Errors of vLLM's teacher-forced log-probabilities (`prompt_logprobs`) against the reference."""
    errors, top1_checked, top1_same = [], 0, 0
    for t in range(1, len(ids)):
        entry = prompt_logprobs[t]
        errors.append(abs(entry[ids[t]].logprob - reference[t - 1, ids[t]].item()))
        top = reference[t - 1].topk(2)
        if float(top.values[0] - top.values[1]) >= CLEAR_MARGIN:
            vllm_top = next(tok for tok, lp in entry.items() if lp.rank == 1)
            top1_checked += 1
            top1_same += vllm_top == int(top.indices[0])
    errors = torch.tensor(errors)
    return dict(max=errors.max().item(), mean=errors.mean().item(), top1_checked=top1_checked, top1_same=top1_same)


def assert_greedy_tokens_match(generated: list[int], steps, min_clear: int) -> None:
    """Each generated token is the reference's argmax where its top-2 margin is clear (`CLEAR_MARGIN`), and within
    `LOGPROB_MAX_ERROR` of it at near-ties; at least `min_clear` steps had a clear margin. steps: the reference's
    log-probabilities [len(generated), vocab] before each generated token."""
    clear = 0
    for token, logprobs in zip(generated, steps):
        top = logprobs.topk(2)
        if float(top.values[0] - top.values[1]) >= CLEAR_MARGIN:
            clear += 1
            assert token == int(top.indices[0])
        else:
            assert float(top.values[0] - logprobs[token]) < LOGPROB_MAX_ERROR
    assert clear >= min_clear


def demo_video(frames: int = 4):
    """A short synthetic clip ([T, H, W, 3] uint8, the demo image panning) and its metadata (2 fps)."""
    import numpy as np

    image = np.asarray(demo_image().resize((112, 84)))
    clip = np.stack([np.roll(image, 7 * i, axis=1) for i in range(frames)])
    metadata = {"fps": 2.0, "total_num_frames": frames, "frames_indices": list(range(frames)), "duration": frames / 2.0}
    return clip, metadata
