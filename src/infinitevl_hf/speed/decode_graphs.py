"""Captured prompts and decode steps kept on the model, so that every `generate()` call of a process reuses them.

A prompt of a given shape and a decode step over a static cache have fixed shapes and addresses, so each can be
captured once as a CUDA graph and replayed. A graph reads fixed buffers, so the graphs of one (rows, dtype,
device) share one static cache of their own, a `GraphSlot`; a `generate()` call's cache holds the slot's
buffers while it decodes: a captured prompt is fed straight into them, or a prompt fed through the module path
is copied in on the first decode step. When another cache takes the slot, the previous one first gets its own
copy (`own_buffers`), so a cache returned by an earlier call stays valid. Capturing is paid by the first call
that needs a graph of a shape, or by `warmup()`.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Callable

import torch

from .model_walk import weight_addresses
from .prompt_graphs import PromptShape, PromptStep, prepare_prompt, prompt_bucket


class CaptureFailed(RuntimeError):
    """A graph could not be captured (its `__cause__` says why). Only the capture is covered, not a replay: a
    failed capture ran nothing, so the call can go on through the module path over the same cache."""


def _captured(capture: Callable, *args):
    try:
        return capture(*args)
    except CaptureFailed:
        raise
    except RuntimeError as error:
        raise CaptureFailed(str(error)) from error


class GraphSlot:
    """The static cache that the graphs of one (rows, dtype, device) read, the graphs, and the cache holding it."""

    def __init__(self, model, rows: int, dtype: torch.dtype, device: torch.device):
        from ..modeling.cache import InfiniteVLCache
        from .weight_layout import lay_out_weights

        lay_out_weights(model)  # the weights' final place, before they are recorded and captured
        self.cache = InfiniteVLCache.empty_static(model.config, rows, dtype, device)
        self.addresses = self.cache.buffer_addresses()
        self.weights = weight_addresses(model)  # after the layout, so not the caller's record from before it
        self.decoder = None  # .step(input_ids) -> logits, over self.cache
        self.prompts: OrderedDict[PromptShape, tuple[PromptStep, Callable]] = OrderedDict()  # least recent first
        self.owner: weakref.ref | None = None

    def valid_for(self, model, weights: tuple | None = None) -> bool:
        """Whether the buffers and weights the graphs read are still where they were at capture. `weights`: a
        record of the model's `weight_addresses` the caller took; it may predate the weights' layout (a call
        planned before another one built this slot), so a mismatch is checked again against the weights now."""
        if self.cache.buffer_addresses() != self.addresses:
            return False
        return weights == self.weights or weight_addresses(model) == self.weights

    def holds(self, cache) -> bool:
        return (
            self.owner is not None
            and self.owner() is cache
            and cache.device_step is self.cache.device_step
            and all(a is b for a, b in zip(cache.layers, self.cache.layers))
        )

    def release(self, copy: bool = True) -> None:
        """The cache holding the buffers now gets its own copy (it stays valid when the slot is fed anew); with
        copy=False it just lets go of them (a cache nobody can reach any more, whose copy would only cost time)."""
        owner = self.owner() if self.owner is not None and copy else None
        if owner is not None and self.holds(owner):
            owner.own_buffers()
        self.owner = None

    def bind(self, cache) -> None:
        """`cache` (static, a prompt went through it) moves its state into the slot's buffers and holds them."""
        self.release()
        cache.share_buffers_of(self.cache)
        self.owner = weakref.ref(cache)

    def adopt(self, cache, seen_tokens: int) -> None:
        """`cache` holds the buffers a prompt was just fed through (a captured prompt)."""
        cache.adopt_buffers_of(self.cache, seen_tokens)
        self.cache.seen_tokens = self.cache.padded_through = seen_tokens
        self.owner = weakref.ref(cache)


class DecodeGraphs:
    """The captured graphs of one model. `step(model, cache, input_ids)` replays a decode step and
    `prompt(model, cache, ...)` a prompt, capturing on first use. Thread-safe: one replay at a time per model.

    capture_decode(model, static_cache) builds what replays a decode step over that cache (a `.step(input_ids)`
    object; default: `capture_decode_step`); capture_prompt(prompt_step, static_cache) returns a
    callable replaying `prompt_step(static_cache)` (default: its CUDA graph).
    """

    # Bounds on what is kept (each slot holds a static cache, ~135 MB per row for InfiniteVL-4B, and each captured
    # prompt its own activation memory, which grows with its rows x length): the least recently used slot or
    # prompt goes first. The bounds let a slot hold every bucket of prompts spread over 1K-4K tokens (17, 39,424
    # tokens in all) and cap long ones at 6 of 8,192 tokens.
    MAX_SLOTS = 4
    MAX_PROMPTS_PER_SLOT = 20
    MAX_PROMPT_TOKENS_PER_SLOT = 49152

    def __init__(self, capture_decode: Callable | None = None, capture_prompt: Callable | None = None):
        self.capture_decode = capture_decode or capture_decode_step
        self.capture_prompt = capture_prompt or capture_prompt_graph
        self.slots: OrderedDict[tuple, GraphSlot] = OrderedDict()  # least recently used first
        self.lock = threading.Lock()
        self.captures = 0
        self.replays = 0
        self.prompt_replays = 0

    def _slot(self, model, rows: int, device: torch.device, weights: tuple | None = None) -> GraphSlot:
        dtype = model.lm_head.weight.dtype
        key = (rows, dtype, device)
        slot = self.slots.get(key)
        if slot is not None and not slot.valid_for(model, weights):  # weights or buffers moved since capture: start over
            slot.release()
            slot = None
        if slot is None:
            while len(self.slots) >= self.MAX_SLOTS:
                _, oldest = self.slots.popitem(last=False)
                oldest.release()
            slot = self.slots[key] = GraphSlot(model, rows, dtype, device)
        self.slots.move_to_end(key)
        return slot

    def release_cache(self, cache, copy: bool = True) -> None:
        """If `cache` holds a slot's buffers, give it its own copy (what `generate()` does before it returns the
        cache, or returns with a cache its caller passed in); copy=False lets the buffers go without one (a cache
        `generate()` made for itself and does not return)."""
        with self.lock:
            for slot in self.slots.values():
                if slot.holds(cache):
                    slot.release(copy)

    def step(self, model, cache, input_ids: torch.LongTensor, weights: tuple | None = None) -> torch.Tensor:
        """Logits [B, 1, V] of one decode step of `cache` (static, a prompt went through it); the cache advances.
        `weights`: the model's `weight_addresses` now, when the caller has them."""
        with self.lock:
            slot = self.slots.get((cache.batch_rows, model.lm_head.weight.dtype, cache.next_positions.device))
            if slot is None or not slot.holds(cache):  # once per call: checking every weight's address is slow
                slot = self._slot(model, cache.batch_rows, cache.next_positions.device, weights)
                slot.bind(cache)
            if slot.decoder is None:
                seen = slot.cache.seen_tokens
                slot.decoder = _captured(self.capture_decode, model, slot.cache)
                slot.cache.seen_tokens = seen
                self.captures += 1
            slot.cache.seen_tokens, slot.cache.padded_through = cache.seen_tokens, cache.padded_through
            logits = slot.decoder.step(input_ids).clone()
            cache.seen_tokens += 1
            self.replays += 1
            return logits

    def prompt(self, model, cache, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
               pixel_values: torch.Tensor | None = None, image_grid_thw: torch.LongTensor | None = None,
               weights: tuple | None = None) -> torch.Tensor | None:
        """Logits [B, 1, V] of a prompt's last position fed from a fresh state into `cache` (which then holds the
        slot's buffers), or None when no captured shape serves it. `weights` as for `step`."""
        if prompt_bucket(input_ids.shape[1], cache.min_window) is None:
            return None
        with self.lock:
            slot = self._slot(model, input_ids.shape[0], input_ids.device, weights)
            prepared = prepare_prompt(model, slot.cache, input_ids, attention_mask, image_grid_thw)
            if prepared is None:
                return None
            shape, inputs = prepared
            slot.release()
            entry = slot.prompts.get(shape)
            if entry is not None:
                slot.prompts.move_to_end(shape)
            else:
                held = sum(kept.rows * kept.length for kept in slot.prompts)
                while slot.prompts and (len(slot.prompts) >= self.MAX_PROMPTS_PER_SLOT
                                        or held + shape.rows * shape.length > self.MAX_PROMPT_TOKENS_PER_SLOT):
                    oldest, _ = slot.prompts.popitem(last=False)
                    held -= oldest.rows * oldest.length
                step = PromptStep(model, shape, inputs, pixel_values)
                step.load(inputs, pixel_values)
                # what the captured call depends on from the host: a cache that nothing went through
                slot.cache.seen_tokens = slot.cache.padded_through = 0
                entry = slot.prompts[shape] = (step, _captured(self.capture_prompt, step, slot.cache))
                self.captures += 1
            step, replay = entry
            step.load(inputs, pixel_values)
            logits = replay().clone()
            slot.adopt(cache, input_ids.shape[1])
            self.prompt_replays += 1
            return logits

    def clear(self) -> None:
        """Drop every graph (their memory is freed); caches holding their buffers keep their own copies."""
        with self.lock:
            for slot in self.slots.values():
                slot.release()
            self.slots.clear()

    def __deepcopy__(self, memo) -> DecodeGraphs:
        return DecodeGraphs(self.capture_decode, self.capture_prompt)  # a copied model captures its own graphs


def capture_decode_step(model, cache):
    """The CUDA graph of the one-token `DecodeStep` (joined projections, the package's Triton kernels; with more than
    one row, cuBLAS's products between them), or of the module path for models that step cannot read
    (`DecodeStep.unsupported`: quantized or LoRA layers)."""
    from .decode_step import DecodeStep
    from .graph_capture import CUDAGraphDecoder

    step = DecodeStep.unsupported(model) is None
    return CUDAGraphDecoder(model, cache, compile=False, concat_projections=step, triton_matvec=step)


def capture_prompt_graph(step: PromptStep, cache) -> Callable[[], torch.Tensor]:
    """The CUDA graph of `step(cache)`: warmed up on a fork of the cache, captured over the cache itself."""
    from .graph_capture import capture_over_cache

    graph, logits = capture_over_cache(cache, step, warmup_steps=2)

    def replay() -> torch.Tensor:
        graph.replay()
        return logits

    return replay


def decode_graphs_of(model) -> DecodeGraphs:
    """The model's graphs, created on first use (kept outside its modules and state dict)."""
    graphs = model.__dict__.get("_decode_graphs")
    if graphs is None:
        graphs = model.__dict__["_decode_graphs"] = DecodeGraphs()
    return graphs
