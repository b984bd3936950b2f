"""A whole streamed call (vision tower, features into the token embeddings, positions, decoder) as one
function without host syncs, and that function captured in a CUDA graph.

A stream feeds calls of the same layout: the same placeholder tokens, the same frame grid, new pixels. Everything
that depends only on the layout is computed once here: the tower's window order, attention segments and rotary
positions (`vision_layout`), where the features go among the tokens, and the call's mRoPE positions relative to
its start (a call without padding takes `relative + start` for every token, the start being where the cache
stands). What is left touches only device tensors, so the whole call can be captured once and replayed (the eager
tower is host-bound: benchmarks/README.md, "Measurements behind the code").

```python
>>> step = CUDAGraphFrames(model, cache, input_ids, image_grid_thw=grid)  # cache: a prompt already went through
>>> hidden = step(pixel_values)                                           # [B, 1, hidden]: the call's last position
```
"""

from __future__ import annotations

import torch
from torch import nn

from ..modeling.compat import CACHE_KWARG
from .graph_capture import capture_over_cache
from .weight_layout import lay_out_weights
from ..modeling.positions import mrope_position_ids, num_vision_tokens


def vision_layout(visual: nn.Module, grid_thw: torch.LongTensor) -> dict:
    """The grid-dependent inputs of a Qwen2.5-VL vision tower, as the keyword arguments its forward takes instead
    of computing them (which needs host syncs): rotary positions, window order, and window/image segments."""
    from transformers.utils.generic import is_flash_attention_requested
    from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids, get_vision_window_index

    layout = {"position_ids": get_vision_position_ids(grid_thw, visual.spatial_merge_size)}
    layout["cu_seqlens"], max_seqlen = get_vision_attention_seqlens(grid_thw, visual.config)
    layout["window_index"], layout["cu_window_seqlens"] = get_vision_window_index(
        grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size, patch_size=visual.patch_size
    )
    # on the grid's device (transformers builds the window order on the CPU and copies it over per call)
    layout = {name: value.to(grid_thw.device) for name, value in layout.items()}
    if is_flash_attention_requested(visual.config):  # varlen kernels take the longest segment as an int
        layout["max_seqlen"] = max_seqlen
        layout["max_window_seqlen"] = int(layout["cu_window_seqlens"].diff().max())
    return layout


class FrameStep:
    """One call of a fixed layout (`input_ids` with image or video placeholders for `grid_thw`, no padding) through
    the model and a cache, with no host sync: `step(pixel_values, cache)` -> last hidden state [B, 1, hidden]."""

    def __init__(self, model, input_ids: torch.LongTensor, image_grid_thw: torch.LongTensor | None = None,
                 video_grid_thw: torch.LongTensor | None = None, second_per_grid_ts: torch.Tensor | None = None):
        if (image_grid_thw is None) == (video_grid_thw is None):
            raise ValueError("A frame step takes the grids of either images or videos (exactly one of the two).")
        base = model.model
        config = base.config
        kind, grid = ("image", image_grid_thw) if image_grid_thw is not None else ("video", video_grid_thw)
        token_id = config.image_token_id if kind == "image" else config.video_token_id
        device = base.get_input_embeddings().weight.device
        self.base, self.input_ids, self.grid = base, input_ids.to(device), grid.to(device)
        slots = (self.input_ids == token_id).flatten().nonzero().flatten()
        expected = int(num_vision_tokens(self.grid, config.vision_config.spatial_merge_size).sum())
        if slots.numel() != expected:
            raise ValueError(f"input_ids hold {slots.numel()} {kind} placeholder tokens, but the grids "
                             f"{self.grid.tolist()} give {expected} features.")
        self.feature_slots = slots
        self.vision_kwargs = vision_layout(base.visual, self.grid)
        self.kind = kind
        self.second_per_grid_ts = None if second_per_grid_ts is None else second_per_grid_ts.detach().to("cpu").clone()
        self.relative_positions = self.positions_for(self.second_per_grid_ts)

    def positions_for(self, second_per_grid_ts: torch.Tensor | None) -> torch.LongTensor:
        """mRoPE positions [3, B, T] of the call from a start of 0 (videos step their time axis by
        `tokens_per_second * second_per_grid_ts`); the call's positions are these plus where the cache stands."""
        config = self.base.config
        positions, _ = mrope_position_ids(
            self.input_ids,
            image_token_id=config.image_token_id,
            video_token_id=config.video_token_id,
            spatial_merge_size=config.vision_config.spatial_merge_size,
            tokens_per_second=config.vision_config.tokens_per_second,
            image_grid_thw=self.grid if self.kind == "image" else None,
            video_grid_thw=self.grid if self.kind == "video" else None,
            second_per_grid_ts=second_per_grid_ts,
        )
        return positions

    def set_seconds_per_grid(self, second_per_grid_ts: torch.Tensor | None) -> None:
        """Videos: the time between temporal grid steps of this call, when it differs from the last call's (the
        positions are rewritten in place, so a captured graph reads the new ones)."""
        seconds = None if second_per_grid_ts is None else second_per_grid_ts.detach().to("cpu").clone()
        same = (seconds is None and self.second_per_grid_ts is None) or (
            seconds is not None and self.second_per_grid_ts is not None and torch.equal(seconds, self.second_per_grid_ts))
        if self.kind == "video" and not same:
            self.relative_positions.copy_(self.positions_for(seconds))
            self.second_per_grid_ts = seconds

    def __call__(self, pixel_values: torch.Tensor, cache) -> torch.Tensor:
        base = self.base
        with torch.no_grad():
            features = base.vision_features(pixel_values, self.grid, **self.vision_kwargs)
            embeds = base.get_input_embeddings()(self.input_ids)
            flat = embeds.view(-1, embeds.shape[-1])
            flat.index_copy_(0, self.feature_slots, features.to(flat.dtype))
            start = cache.next_positions
            positions = self.relative_positions if start is None else self.relative_positions + start.view(1, -1, 1)
            return base.language_model(
                inputs_embeds=embeds, position_ids=positions, use_cache=True, keep_last=1, **{CACHE_KWARG: cache}
            ).last_hidden_state


class CUDAGraphFrames:
    """A `FrameStep` captured in one CUDA graph through a static cache and replayed for every later call of the
    same layout (the frame chunks of a stream). `__call__(pixel_values)` -> last hidden state [B, 1, hidden] (a
    buffer reused per call)."""

    def __init__(self, model, cache, input_ids: torch.LongTensor, warmup_steps: int = 2, **grids):
        if not torch.cuda.is_available() or cache.next_positions is None or not cache.next_positions.is_cuda:
            raise ValueError("CUDAGraphFrames needs a CUDA model and a cache that a prompt already went through.")
        cache.to_static()
        if input_ids.shape[1] > cache.max_tokens_per_call:
            raise ValueError(f"A captured call takes at most one window ({cache.max_tokens_per_call} tokens), "
                             f"got {input_ids.shape[1]}.")
        if input_ids.shape[0] != cache.batch_rows:
            raise ValueError(f"input_ids have {input_ids.shape[0]} rows, the cache {cache.batch_rows}.")
        lay_out_weights(model)  # before any capture: see `speed.weight_layout`
        self.step, self.cache, self.length = FrameStep(model, input_ids, **grids), cache, input_ids.shape[1]
        visual = model.model.visual
        patches = int(self.step.grid.prod(-1).sum())
        self.pixel_values = torch.zeros(patches, visual.patch_embed.proj.weight[0].numel(), dtype=visual.dtype,
                                        device=self.step.input_ids.device)
        self.warmup_steps = warmup_steps
        self._capture()

    def _capture(self) -> None:
        # A long chunk's attention masks the rings' empty slots until they fill (`InfiniteVLCache.window_is_full`):
        # a graph captured before then is right but slower, so it is captured again once they are full.
        self.graph = self.hidden = None  # (free the old graph's memory first)
        self.full_windows = self.cache.full_windows
        self.graph, self.hidden = capture_over_cache(self.cache, lambda c: self.step(self.pixel_values, c),
                                                     self.warmup_steps)

    def __call__(self, pixel_values: torch.Tensor, second_per_grid_ts: torch.Tensor | None = None) -> torch.Tensor:
        """Feed this call's pixels (and, for videos whose frame timing changed, its seconds per grid step)."""
        if second_per_grid_ts is not None:
            self.step.set_seconds_per_grid(second_per_grid_ts)
        if pixel_values.shape != self.pixel_values.shape:
            raise ValueError(f"this graph was captured for pixel values of shape {tuple(self.pixel_values.shape)}, "
                             f"got {tuple(pixel_values.shape)}")
        if self.cache.full_windows != self.full_windows:
            self._capture()
        self.pixel_values.copy_(pixel_values)
        self.graph.replay()
        self.cache.seen_tokens += self.length
        return self.hidden
