"""`LLM.generate` on the tiny checkpoint against this package's fp32 model: text, image, greedy, mixed batches."""

from __future__ import annotations

import copy

import torch
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from vllm_helpers import (
    assert_greedy_tokens_match,
    LOGPROB_MAX_ERROR,
    LOGPROB_MEAN_ERROR,
    WINDOW,
    chat_prompt,
    compare_prompt_logprobs,
    corpus_text,
    demo_image,
    demo_video,
    reference_logprobs,
)

TEACHER_FORCED = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)


def _text_ids(processor, tokens: int = 5 * WINDOW) -> list[int]:
    ids = processor.tokenizer(corpus_text(4000))["input_ids"][:tokens]
    assert len(ids) == tokens
    return ids


def test_reference_is_sensitive(reference):
    """The tolerance below is meaningful: without the Gated DeltaNet layers, or with a wider window, the fp32
    model's log-probabilities move by far more than it."""
    model, processor = reference
    ids = torch.tensor([_text_ids(processor)])
    with torch.no_grad():
        base = model(input_ids=ids).logits[0].log_softmax(-1)
        changed = copy.deepcopy(model)
        for i, kind in enumerate(model.config.text_config.layer_types):
            if kind == "linear_attention":
                changed.model.language_model.layers[i].self_attn.o_proj.weight.zero_()
        no_gdn = changed(input_ids=ids).logits[0].log_softmax(-1)
    assert (no_gdn - base).abs().max() > 10 * LOGPROB_MAX_ERROR


def test_text_logprobs_match_fp32_reference(llm, reference):
    """A 160-token prompt (5 windows): teacher-forced log-probabilities within tolerance, same top-1 where clear."""
    model, processor = reference
    ids = _text_ids(processor)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    out = llm.generate([TokensPrompt(prompt_token_ids=ids)], TEACHER_FORCED)[0]
    errors = compare_prompt_logprobs(ids, expected, out.prompt_logprobs)
    assert errors["max"] < LOGPROB_MAX_ERROR and errors["mean"] < LOGPROB_MEAN_ERROR, errors
    assert errors["top1_checked"] > 50 and errors["top1_same"] == errors["top1_checked"], errors


def test_image_logprobs_match_fp32_reference(llm, reference):
    """A chat prompt with an image: vLLM's processing gives the same tokens, and the log-probabilities (vision
    tower, scattered features, 3-D positions, then text several windows long) are within tolerance."""
    model, processor = reference
    image = demo_image()
    prompt = chat_prompt(processor, corpus_text(300), image=True)
    ids, expected = reference_logprobs(model, processor, prompt, image)
    assert len(ids) > 4 * WINDOW
    out = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": image}}], TEACHER_FORCED)[0]
    assert out.prompt_token_ids == ids
    errors = compare_prompt_logprobs(ids, expected, out.prompt_logprobs)
    assert errors["max"] < LOGPROB_MAX_ERROR and errors["mean"] < LOGPROB_MEAN_ERROR, errors
    assert errors["top1_same"] == errors["top1_checked"], errors


def test_video_logprobs_match_fp32_reference(llm, reference):
    """A chat prompt with a 4-frame video (2 temporal grid steps, 2 fps: mRoPE time positions 0 and 2)."""
    model, processor = reference
    clip, metadata = demo_video()
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": corpus_text(200)}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], videos=[clip], video_metadata=[metadata], return_tensors="pt")
    assert inputs["video_grid_thw"][0, 0] == 2
    ids = inputs["input_ids"][0].tolist()
    with torch.no_grad():
        expected = model(**inputs).logits[0].float().log_softmax(-1)
    out = llm.generate([{"prompt": prompt, "multi_modal_data": {"video": (clip, metadata)}}], TEACHER_FORCED)[0]
    assert out.prompt_token_ids == ids
    errors = compare_prompt_logprobs(ids, expected, out.prompt_logprobs)
    assert errors["max"] < LOGPROB_MAX_ERROR and errors["mean"] < LOGPROB_MEAN_ERROR, errors
    assert errors["top1_same"] == errors["top1_checked"], errors


def test_greedy_tokens_match_where_margin_is_clear(llm, reference):
    """Greedy decoding (decode kernels, state carried token to token), text and image: fed back through the fp32
    model, every token vLLM chose is the fp32 argmax wherever the fp32 top-2 margin is clear, and within the
    log-probability tolerance of it at near-ties."""
    model, processor = reference
    image = demo_image()
    cases = [(chat_prompt(processor, corpus_text(200), image=False), None), (chat_prompt(processor, "Describe it.", image=True), image)]
    for prompt, img in cases:
        request = {"prompt": prompt, **({"multi_modal_data": {"image": img}} if img is not None else {})}
        out = llm.generate([request], SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))[0]
        generated = list(out.outputs[0].token_ids)
        ids, expected = reference_logprobs(model, processor, prompt, img, continuation=generated)
        assert_greedy_tokens_match(generated, expected[len(ids) - len(generated) - 1 : -1], min_clear=8)


def test_mixed_batch_equals_prompts_alone(llm, reference):
    """Continuous batching: text and image prompts of different lengths decoded together give each prompt's
    tokens and log-probabilities alone."""
    _, processor = reference
    image = demo_image()
    requests = [
        {"prompt": chat_prompt(processor, corpus_text(400), image=False)},
        {"prompt": chat_prompt(processor, "What is in the picture?", image=True), "multi_modal_data": {"image": image}},
        {"prompt": chat_prompt(processor, "Hello.", image=False)},
        {"prompt": chat_prompt(processor, corpus_text(150), image=True), "multi_modal_data": {"image": image}},
    ]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=1)
    together = llm.generate(requests, params)
    for request, batched in zip(requests, together):
        alone = llm.generate([request], params)[0]
        assert batched.outputs[0].token_ids == alone.outputs[0].token_ids
        for step_b, step_a, token in zip(batched.outputs[0].logprobs, alone.outputs[0].logprobs, alone.outputs[0].token_ids):
            assert abs(step_b[token].logprob - step_a[token].logprob) < 2e-2
