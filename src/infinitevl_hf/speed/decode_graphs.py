"""Captured decode steps kept on the model, so that every `generate()` call of a process reuses them.

A decode step over a static cache has fixed shapes and addresses, so it can be captured once as a CUDA graph
(`modeling.cuda_graph.CUDAGraphDecoder` over the compiled `FusedDecodeStep`) and replayed per token. A graph
reads fixed buffers, so each graph owns a static cache of its own; a `generate()` call's cache *binds* to it
on its first decode step: its state is copied into the graph's buffers, and it then holds those buffers
itself. When another cache binds, the previous one first gets its own copy back (`own_buffers`), so a cache
returned by an earlier call stays valid. One graph per (rows, dtype, device); compiling and capturing are
paid by the first call that needs a graph of that shape, or by `warmup()`.
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable

import torch


def _weight_addresses(model) -> tuple:
    return tuple((p.data_ptr(), p.dtype) for p in model.parameters())


class DecodeGraph:
    """One captured decode step over a static cache of its own, and the cache bound to it now."""

    def __init__(self, model, cache, capture: Callable):
        """cache: a static cache a prompt went through (of the shape to capture); it is forked, not captured."""
        self.cache = cache.fork()
        self.decoder = capture(model, self.cache)  # .step(input_ids [B, 1]) -> logits [B, 1, V], a reused buffer
        self.addresses = self.cache.buffer_addresses()
        self.weights = _weight_addresses(model)
        self.owner: weakref.ref | None = None

    def valid_for(self, model) -> bool:
        """Whether the buffers and weights the graph reads are still where they were at capture."""
        return self.cache.buffer_addresses() == self.addresses and _weight_addresses(model) == self.weights

    def holds(self, cache) -> bool:
        return (
            self.owner is not None
            and self.owner() is cache
            and cache.device_step is self.cache.device_step
            and all(a is b for a, b in zip(cache.layers, self.cache.layers))
        )

    def bind(self, cache) -> None:
        """Make `cache` (static, same shape) the one this graph decodes: its state moves into the graph's buffers."""
        previous = self.owner() if self.owner is not None else None
        if previous is not None and previous is not cache and self.holds(previous):
            previous.own_buffers()  # an earlier call's cache keeps its memory
        cache.share_buffers_of(self.cache)
        self.owner = weakref.ref(cache)

    def step(self, cache, input_ids: torch.LongTensor) -> torch.Tensor:
        self.cache.seen_tokens, self.cache.padded_through = cache.seen_tokens, cache.padded_through
        logits = self.decoder.step(input_ids).clone()
        cache.seen_tokens += 1
        return logits


class DecodeGraphs:
    """The decode graphs of one model: `step(model, cache, input_ids)` captures on first use and replays after.

    capture(model, static_cache) builds what replays one step over that cache (a `.step(input_ids)` object);
    the default is the CUDA graph of the compiled step. Thread-safe: one step at a time per model.
    """

    def __init__(self, capture: Callable | None = None):
        self.capture = capture or capture_compiled_graph
        self.graphs: dict[tuple, DecodeGraph] = {}
        self.lock = threading.Lock()
        self.captures = 0
        self.replays = 0

    def step(self, model, cache, input_ids: torch.LongTensor) -> torch.Tensor:
        """Logits [B, 1, V] of one decode step of `cache` (a prompt went through it); the cache advances."""
        cache.to_static()
        like = cache.next_positions
        key = (cache.batch_rows, model.lm_head.weight.dtype, like.device)
        with self.lock:
            graph = self.graphs.get(key)
            if graph is not None and not graph.holds(cache):
                if not graph.valid_for(model):  # weights or buffers moved since capture: capture again
                    graph = self.graphs.pop(key)
                    if graph.owner is not None and graph.owner() is not None and graph.holds(graph.owner()):
                        graph.owner().own_buffers()
                    graph = None
                else:
                    graph.bind(cache)
            if graph is None:
                graph = self.graphs[key] = DecodeGraph(model, cache, self.capture)
                self.captures += 1
                graph.bind(cache)
            self.replays += 1
            return graph.step(cache, input_ids)

    def clear(self) -> None:
        """Drop every graph (their memory is freed); caches bound to them keep their own copies."""
        with self.lock:
            for graph in self.graphs.values():
                owner = graph.owner() if graph.owner is not None else None
                if owner is not None and graph.holds(owner):
                    owner.own_buffers()
            self.graphs.clear()

    def __deepcopy__(self, memo) -> DecodeGraphs:
        return DecodeGraphs(self.capture)  # a copied model captures its own graphs


def capture_compiled_graph(model, cache):
    """The CUDA graph of the compiled one-token step (joined projections, Triton matrix-vector kernels)."""
    from ..modeling.cuda_graph import CUDAGraphDecoder

    return CUDAGraphDecoder(model, cache, compile="fused", concat_projections=True, triton_matvec=True)


def decode_graphs_of(model) -> DecodeGraphs:
    """The model's decode graphs, created on first use (kept outside its modules and state dict)."""
    graphs = model.__dict__.get("_decode_graphs")
    if graphs is None:
        graphs = model.__dict__["_decode_graphs"] = DecodeGraphs()
    return graphs
