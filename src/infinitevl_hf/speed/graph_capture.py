"""One-token decode steps replayed from a captured CUDA graph.

Decoding one token of a 4B model launches hundreds of small kernels; on a fast GPU the launches, not
the arithmetic, set the time. Because an InfiniteVL cache has a fixed size (a ring per attention
layer, fixed Gated DeltaNet states), a whole decode step has static shapes and addresses once the
cache is static (`InfiniteVLCache.to_static`), so it can be captured once and replayed per token.

The same holds for feeding a fixed number of tokens, e.g. one video frame per call in a stream:
`CUDAGraphPrefill` captures the decoder over `length` input embeddings (the vision tower stays eager;
`frame_graph.CUDAGraphFrames` captures whole calls of frames, tower included).

`generate()` on CUDA replays decode steps of the fused `DecodeStep` (concatenated projections, the package's Triton
kernels; cuBLAS's products for batches of rows), kept on the model by `speed.decode_graphs`; or use them directly:

```python
>>> decoder = CUDAGraphDecoder(model, cache)     # cache: a prompt already went through it
>>> logits = decoder.step(next_token_ids)        # [B, 1] -> [B, 1, vocab]
```
"""

from __future__ import annotations

import torch

from ..modeling.compat import CACHE_KWARG
from .compile_ahead import compile_ahead
from .decode_step import DecodeStep
from .weight_layout import lay_out_weights

def capture_over_cache(cache, forward, warmup_steps: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Warm `forward(cache)` up on a fork of the cache (kernels pick their configs and allocate outside the
    capture, the real state untouched), then capture one call over the real cache: (graph, its output).

    The first warm-up is a `compile_ahead` pass on a fork of its own (its skipped kernels leave garbage), which
    compiles the Triton kernels met for the first time side by side; at least one real warm-up follows."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fork = cache.fork()
        if compile_ahead(lambda: forward(fork)) is not None:
            warmup_steps = max(1, warmup_steps - 1)
        del fork
        scratch = cache.fork()
        for _ in range(warmup_steps):
            forward(scratch)
    torch.cuda.current_stream().wait_stream(stream)
    del scratch
    graph = torch.cuda.CUDAGraph()
    counters = cache.seen_tokens, cache.padded_through
    empties = [(layer, layer.empty) for layer in cache.layers if hasattr(layer, "empty")]
    try:
        with torch.cuda.graph(graph):
            output = forward(cache)
    finally:
        # capture recorded the call without running it: the host's view of the state is what it was before
        cache.seen_tokens, cache.padded_through = counters
        for layer, empty in empties:
            layer.empty = empty
    return graph, output


class CUDAGraphDecoder:
    """Captures `model(input_ids[B, 1], cache)` once and replays it for every following token."""

    def __init__(self, model, cache, warmup_steps: int = 2, compile: bool = False, concat_projections: bool = False,
                 triton_matvec: bool = False):
        """compile=False and triton_matvec=False capture the module path's kernels; otherwise the `DecodeStep`
        (each decoder layer one function of tensors over the package's kernels; compile=True `torch.compile`s them,
        which fuses the torch ops left between the kernels; results then differ from the module path by rounding).
        concat_projections, triton_matvec: see `DecodeStep`."""
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be True or False, got {compile!r}")
        if not torch.cuda.is_available() or cache.next_positions is None or not cache.next_positions.is_cuda:
            raise ValueError("CUDAGraphDecoder needs a CUDA model and a cache that a prompt already went through.")
        cache.to_static()
        lay_out_weights(model)  # before any capture: see `speed.weight_layout`
        # Built outside the capture (concatenating weights inside it would record the copies into the graph).
        self.decode_step = None
        if compile or triton_matvec:
            self.decode_step = DecodeStep(model, cache, compile=compile, concat_projections=concat_projections,
                                          triton_matvec=triton_matvec)
            warmup_steps = max(warmup_steps, 3)  # the first calls compile (JIT); capture after the kernels settled
        self.model, self.cache = model, cache
        self.input_ids = torch.zeros(cache.batch_rows, 1, dtype=torch.long, device=cache.next_positions.device)
        self.graph, self.logits = capture_over_cache(cache, self._forward, warmup_steps)

    def _forward(self, cache) -> torch.Tensor:
        if self.decode_step is not None:
            step = self.decode_step if cache is self.cache else self.decode_step.with_cache(cache)
            return step(self.input_ids)
        with torch.no_grad():
            return self.model(
                input_ids=self.input_ids, use_cache=True, logits_to_keep=1, **{CACHE_KWARG: cache}
            ).logits

    def step(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Feed one token per row; returns the logits of the next token [B, 1, vocab] (a buffer reused per step)."""
        self.input_ids.copy_(input_ids)
        self.graph.replay()
        self.cache.seen_tokens += 1
        return self.logits


class CUDAGraphPrefill:
    """Captures the decoder over `length` embedded tokens ([B, length, hidden] plus 3-D positions) through a
    static cache, and replays it for every later call of the same length (the frames of a stream).

    ```python
    >>> step = CUDAGraphPrefill(model, cache, length=258)   # cache: static-able, a prompt already went through
    >>> hidden = step(inputs_embeds, position_ids)          # [B, 1, hidden]: the last position
    ```
    """

    def __init__(self, model, cache, length: int, warmup_steps: int = 2):
        if not torch.cuda.is_available() or cache.next_positions is None or not cache.next_positions.is_cuda:
            raise ValueError("CUDAGraphPrefill needs a CUDA model and a cache that a prompt already went through.")
        cache.to_static()
        if length > cache.max_tokens_per_call:
            raise ValueError(f"A captured prefill takes at most one window ({cache.max_tokens_per_call} tokens), got {length}.")
        lay_out_weights(model)  # before any capture: see `speed.weight_layout`
        self.decoder, self.cache, self.length = model.model.language_model, cache, length
        embed = self.decoder.get_input_embeddings().weight
        self.inputs_embeds = torch.zeros(cache.batch_rows, length, embed.shape[1], dtype=embed.dtype, device=embed.device)
        self.position_ids = torch.zeros(3, cache.batch_rows, length, dtype=torch.long, device=embed.device)
        self.graph, self.hidden = capture_over_cache(cache, self._forward, warmup_steps)

    def _forward(self, cache) -> torch.Tensor:
        with torch.no_grad():
            return self.decoder(
                inputs_embeds=self.inputs_embeds, position_ids=self.position_ids, use_cache=True, keep_last=1,
                **{CACHE_KWARG: cache},
            ).last_hidden_state

    def __call__(self, inputs_embeds: torch.Tensor, position_ids: torch.LongTensor) -> torch.Tensor:
        """Feed [B, length, hidden] embeddings at positions [3, B, length]; returns the last hidden state [B, 1, hidden]."""
        self.inputs_embeds.copy_(inputs_embeds)
        self.position_ids.copy_(position_ids)
        self.graph.replay()
        self.cache.seen_tokens += self.length
        return self.hidden
