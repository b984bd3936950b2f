"""The entry points from the model into the speed machinery during `generate()`.

`generate()` runs inside `generate_call()`; when transformers prepares the call's cache, `plan_generation`
picks its decode path (`plan.decode_plan`) and logs once why it is not the fastest. Every `forward` call asks
`fast_forward` first: a fresh prompt or a decode step of that cache replays the
model's captured graphs (or turns the cache static for the module path); it returns None where the module path
serves.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch
from transformers.utils import logging

from ..modeling.ops.dispatch import off_current_device, triton_available
from .decode_graphs import CaptureFailed, decode_graphs_of
from .model_walk import ModelWalk, model_walk
from .plan import DecodePlan, decode_plan
from .sampling_loop import loop_problem
from .weight_layout import lay_out_weights

logger = logging.get_logger(__name__)


@dataclass
class _Call:
    plan: DecodePlan | None = None
    cache: object = None
    stock: bool = True  # generate() runs one of transformers' own decoding methods (no custom_generate)
    cache_returned: bool = True  # whether the caller can reach the cache after the call (then it gets its own copy)
    weights: tuple | None = None  # the model's weight record, taken once per call for the graphs' check


_CURRENT = contextvars.ContextVar("infinitevl_generate_call", default=None)
_CAPTURE_FAILED = "_decode_capture_failed"  # on a model whose modules would not be captured: why


@contextlib.contextmanager
def generate_call(model, custom_generate: bool = False):
    """Scope of one `generate()` call: the plan made for its cache applies to it alone, and a cache its caller can
    reach afterwards (passed in, returned with `return_dict_in_generate`, or in the hands of a `custom_generate`
    or Hub decoding method) holds memory of its own, not the captured graphs' buffers, which the next call
    overwrites. A cache nobody can reach is let go without a copy."""
    call = _Call(stock=not custom_generate)
    token = _CURRENT.set(call)
    try:
        yield
    finally:
        _CURRENT.reset(token)
        graphs = model.__dict__.get("_decode_graphs")
        if graphs is not None and call.cache is not None:
            graphs.release_cache(call.cache, copy=call.cache_returned)


def plan_for_model(model, device: torch.device, generation_config=None, walk: ModelWalk | None = None,
                   weights: tuple | None = None) -> DecodePlan:
    """`decode_plan` for this model on `device` with these generation flags (`walk`: the model's `model_walk`, and
    `weights` its `weights()`, when the caller has them)."""
    flags = generation_config
    cuda = device.type == "cuda"
    problems = (None, None)  # (capture, compiled step)
    if cuda:
        walk = model_walk(model) if walk is None else walk
        problems = walk.problems(model, walk.weights() if weights is None else weights)
    elsewhere = _off_current_device(device) if cuda else None
    text = model.config.get_text_config()
    return decode_plan(
        device_type=device.type,
        dtype=model.lm_head.weight.dtype,
        training=model.training,
        disable_compile=bool(getattr(flags, "disable_compile", False)),
        output_attentions=bool(getattr(flags, "output_attentions", False)),
        output_hidden_states=bool(getattr(flags, "output_hidden_states", False)),
        triton_available=triton_available() if cuda else True,
        model_problem=problems[1],
        capture_problem=model.__dict__.get(_CAPTURE_FAILED) or problems[0] or elsewhere,
        static_requested=getattr(flags, "cache_implementation", None) == "static",
        static_possible=all(text.window_for_layer(i) is not None
                            for i, kind in enumerate(text.layer_types) if kind != "linear_attention"),
    )


def _off_current_device(device: torch.device) -> str | None:
    """Why graphs cannot serve a model on `device` now: a CUDA graph captures the current device's stream and
    Triton launches there, so a model on another GPU keeps the module path until that GPU is made current."""
    where = off_current_device(device)
    if where is None:
        return None
    return (f"the model is on {where} that graphs and Triton kernels run on "
            f"(torch.cuda.set_device({device.index}) lets them serve it)")


def plan_generation(model, generation_config, cache, device: torch.device, cache_given: bool = True) -> DecodePlan:
    """Choose the decode path of the current `generate()` call for `cache`, and say once why it is not a graph.
    cache_given: the caller passed `cache` in (so it holds it after the call)."""
    cache.check_compatible(model.config)  # the captured paths bypass the decoder, which checks this itself
    walk = model_walk(model) if device.type == "cuda" else None  # walked once per module tree (`speed.model_walk`)
    weights = walk.weights() if walk is not None else None  # read on every call, for both checks
    plan = plan_for_model(model, device, generation_config, walk, weights)
    if plan.path == "static" and device.type == "cuda" and not model.training:
        lay_out_weights(model)  # the module path's decode then joins its projections (`modeling.joined_linear`)
    call = _CURRENT.get()
    if call is not None:
        call.plan, call.cache = plan, cache
        call.cache_returned = (cache_given or bool(getattr(generation_config, "return_dict_in_generate", False))
                               or not call.stock or not _stock_decoding(generation_config))
        if plan.path == "graph":
            call.weights = weights if weights is not None else model_walk(model).weights()
    if plan.reason is not None:
        if plan.path == "graph":
            message = ("InfiniteVL generate() replays the module path captured in a CUDA graph, not the compiled "
                       f"decode step: {plan.reason}.")
        else:
            message = f"InfiniteVL generate() decodes through the module path ({plan.path} cache): {plan.reason}."
        (logger.info_once if device.type != "cuda" else logger.warning_once)(message)
    return plan


def samples_ahead(model, generation_config, synced_gpus: bool, model_kwargs: dict) -> bool:
    """Whether this call's greedy / sampling loop runs with the host a step ahead (`sampling_loop.sample_ahead`);
    where it cannot, says why once in the log (CUDA only: elsewhere the host never waits on a queue)."""
    call = _CURRENT.get()
    device = model.lm_head.weight.device
    problem = loop_problem(
        device_type=device.type,
        synced_gpus=bool(synced_gpus),
        is_assistant=bool(getattr(generation_config, "is_assistant", False)),
        return_dict_in_generate=bool(generation_config.return_dict_in_generate),
        cache_returned=call is None or call.cache_returned,
        planned=call is not None and call.cache is not None,
        auto_compile=device.type == "cuda" and model._valid_auto_compile_criteria(model_kwargs, generation_config),
        available=hasattr(model, "_prefill") and hasattr(model, "_optimize_model_for_decode"),
    )
    if problem is not None and device.type == "cuda":
        logger.info_once(f"InfiniteVL generate() waits for the GPU after every token: {problem}.")
    return problem is None


def _stock_decoding(generation_config) -> bool:
    """Whether transformers decodes this call with one of its own methods (which return the cache only with
    `return_dict_in_generate`), not a decoding method loaded from the Hub; False when that cannot be told."""
    try:
        from transformers.generation.utils import GENERATION_MODES_MAPPING

        return "/" not in GENERATION_MODES_MAPPING[generation_config.get_generation_mode()]
    except Exception:  # another transformers layout: keep the copy
        return False


def fast_forward(model, cache, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                 labels=None, pixel_values=None, pixel_values_videos=None, image_grid_thw=None, second_per_grid_ts=None,
                 logits_to_keep=0, output_hidden_states=None, output_attentions=None, cu_seqlens=None
                 ) -> torch.Tensor | None:
    """The model's one call into the speed machinery: logits of a `forward` call that a captured graph serves (a
    fresh prompt, or a decode step, of the cache the current `generate()` call planned for), else None."""
    call = _CURRENT.get()
    if (call is None or call.plan is None or cache is None or call.cache is not cache or labels is not None
            or output_attentions or output_hidden_states):
        return None
    if (cache.next_positions is None and input_ids is not None and inputs_embeds is None and position_ids is None
            and pixel_values_videos is None and second_per_grid_ts is None and cu_seqlens is None
            and isinstance(logits_to_keep, int) and logits_to_keep == 1):
        return _fast_prompt(model, call, cache, input_ids, attention_mask, pixel_values, image_grid_thw)
    if (cache.seen_tokens > 0 and input_ids is not None and input_ids.shape[1] == 1 and inputs_embeds is None
            and pixel_values is None and pixel_values_videos is None):
        return _fast_decode(model, call, cache, input_ids)
    return None


def _fast_decode(model, call: _Call, cache, input_ids: torch.LongTensor) -> torch.Tensor | None:
    """Logits of one decode step of the call's cache through its captured graph, or None for the module path
    (over the cache made static, unless the plan keeps it dynamic)."""
    if call.plan.path == "dynamic":
        return None
    cache.to_static()
    if call.plan.path == "static":
        return None
    try:
        return decode_graphs_of(model).step(model, cache, input_ids, call.weights)
    except CaptureFailed as error:
        _capture_failed(model, call, error)
        return None


def _fast_prompt(model, call: _Call, cache, input_ids: torch.LongTensor, attention_mask=None, pixel_values=None,
                 image_grid_thw=None) -> torch.Tensor | None:
    """Logits of a fresh prompt's last position through a captured prompt, or None for the module path."""
    if call.plan.path != "graph" or cache.is_static:  # a static cache holding a stream continues it: module path
        return None
    from ..modeling.input_checks import check_vision_inputs

    check_vision_inputs(model.config, input_ids, pixel_values, image_grid_thw, None, None)  # as the module path does
    try:
        return decode_graphs_of(model).prompt(model, cache, input_ids, attention_mask, pixel_values, image_grid_thw,
                                              call.weights)
    except CaptureFailed as error:
        _capture_failed(model, call, error)
        return None


def _capture_failed(model, call: _Call, error: CaptureFailed) -> None:
    """Layers whose kernels were let into a graph (LoRA, torchao) would not be captured: this model decodes through
    its modules from now on, saying why (the cache is untouched: a failed capture runs nothing). Re-raises for the
    compiled step, whose capture is expected to work."""
    cause = error.__cause__ or error
    if call.plan.step != "modules":
        raise cause
    reason = f"capturing its modules in a CUDA graph failed ({type(cause).__name__}: {str(cause)[:200]})"
    model.__dict__[_CAPTURE_FAILED] = reason
    call.plan = DecodePlan("static", reason)
    logger.warning_once(f"InfiniteVL generate() decodes through the module path (static cache): {reason}.")


def warmup(model, batch_sizes: tuple[int, ...] = (1,), prompt_tokens: int = 64, new_tokens: int = 2) -> None:
    """Pay a process's one-time costs (kernel autotuning, compilation, graph capture) now: one short `generate()`
    per batch size. Later calls with those batch sizes (same dtype and device) capture and compile nothing."""
    if not batch_sizes or any(not isinstance(rows, int) or rows < 1 for rows in batch_sizes):
        raise ValueError(f"warmup() takes batch sizes of at least 1 row, got {batch_sizes!r}.")
    if not isinstance(prompt_tokens, int) or prompt_tokens < 1:
        raise ValueError(f"warmup() takes a prompt of at least 1 token, got prompt_tokens={prompt_tokens!r}.")
    device = model.lm_head.weight.device
    text = model.config.get_text_config()
    special = {getattr(model.config, name, None) for name in
               ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    for value in (text.pad_token_id, text.bos_token_id, text.eos_token_id):
        special |= set(value) if isinstance(value, (list, tuple)) else {value}
    plain = torch.tensor([t for t in range(min(text.vocab_size, 1000)) if t not in special])  # text tokens only
    generator = torch.Generator().manual_seed(0)
    for rows in batch_sizes:
        ids = plain[torch.randint(len(plain), (rows, prompt_tokens), generator=generator)].to(device)
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=model.config.get_text_config().pad_token_id)
