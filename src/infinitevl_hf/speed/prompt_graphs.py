"""A prompt (text, and images of given grids) fed from a fresh state as device work only, so that it can be
captured once per shape and replayed for every prompt of that shape.

A prompt of L tokens is laid into the smallest captured length that holds it (`PROMPT_BUCKETS`), left-padded:
the pad tokens are flagged invalid, so no attention reads them and no Gated DeltaNet state takes them in, and
the ring's step starts at minus the padding, so the real tokens sit where an unpadded prompt would put them
(token n in slot n % window) and the cache continues at L. Host work per prompt: the
mRoPE positions and the placeholder slots, computed here before the replay.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# Captured prompt lengths: padding stays a small part of the work. Fewer than 64 padding tokens up to 512 (a photo
# and its question, 319 tokens, pad to 320, not 512), 128 up to 2048 (a 1K-token text prompt of 1,053 tokens pads
# to 1,152: on an H200 its graph ran 19.9 ms against 20.8 ms at 256 apart, `benchmarks/prompt_buckets.py`), 256 up
# to 4096 (a page of 3,133 tokens pads to 3,328, not 4,096: a fifth less decoder work) and 512 above. The price:
# each length is captured on its first use per shape (0.3 s once its kernels are compiled, ~200 MB of graph memory
# at 1K tokens), and prompts of varied lengths meet up to 20 of them up to 2,048 tokens, not 16.
PROMPT_BUCKETS = (64, 128, *range(192, 512, 64), *range(512, 2048, 128), *range(2048, 4096, 256),
                  *range(4096, 8193, 512))


class PromptShape(NamedTuple):
    """What a captured prompt depends on: rows, captured length, and the image grids (in prompt order)."""

    rows: int
    length: int
    grids: tuple[tuple[int, int, int], ...]


def prompt_bucket(length: int, limit: int) -> int | None:
    """The captured length a prompt of `length` tokens is laid into, or None when none fits under `limit`."""
    return next((b for b in PROMPT_BUCKETS if length <= b <= limit), None)


def prepare_prompt(model, cache, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None,
                   image_grid_thw: torch.LongTensor | None) -> tuple[PromptShape, dict] | None:
    """The shape and the device inputs of a prompt laid into its bucket; None when no captured shape serves it
    (too long for one window, or placeholders that do not match the grids: the module path then says why)."""
    from ..modeling.modeling_infinitevl import text_position_ids
    from ..modeling.positions import mrope_position_ids, num_vision_tokens

    config = model.config
    rows, length = input_ids.shape
    bucket = prompt_bucket(length, cache.min_window)
    if bucket is None:
        return None
    device = input_ids.device
    valid = attention_mask.to(device).bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    if image_grid_thw is not None:
        expected = int(num_vision_tokens(image_grid_thw, config.vision_config.spatial_merge_size).sum())
        if int((input_ids == config.image_token_id).sum()) != expected:
            return None
        positions, _ = mrope_position_ids(
            input_ids, image_token_id=config.image_token_id, video_token_id=config.video_token_id,
            spatial_merge_size=config.vision_config.spatial_merge_size,
            tokens_per_second=config.vision_config.tokens_per_second, image_grid_thw=image_grid_thw,
            attention_mask=attention_mask,
        )
    else:
        positions = text_position_ids(None if bool(valid.all()) else valid, None, rows, length, device)
    pad = bucket - length
    ids = torch.cat([input_ids.new_zeros(rows, pad), input_ids], 1)
    inputs = {
        "input_ids": ids,
        "token_valid": torch.cat([valid.new_zeros(rows, pad), valid], 1),
        "position_ids": torch.cat([positions.new_ones(3, rows, pad), positions.to(device)], 2),
        "start": torch.tensor([-pad], dtype=torch.long, device=device),
        "feature_slots": (ids == config.image_token_id).flatten().nonzero().flatten(),
    }
    grids = () if image_grid_thw is None else tuple(tuple(int(x) for x in g) for g in image_grid_thw.tolist())
    return PromptShape(rows, bucket, grids), inputs


class PromptStep:
    """A prompt of one `PromptShape` from a fresh state through the model: `step(cache)` -> logits [B, 1, V] of
    its last position. Reads its inputs from buffers that `load` fills (a captured graph reads the same ones)."""

    def __init__(self, model, shape: PromptShape, like: dict, pixel_values: torch.Tensor | None):
        from .frame_graphs import vision_layout

        self.model, self.shape = model, shape
        self.buffers = {name: torch.zeros_like(value) for name, value in like.items()}
        self.pixel_values = None if pixel_values is None else torch.zeros_like(pixel_values)
        self.grid = self.vision_kwargs = None
        if shape.grids:
            self.grid = torch.tensor(shape.grids, dtype=torch.long, device=like["input_ids"].device)
            self.vision_kwargs = vision_layout(model.model.visual, self.grid)

    def load(self, inputs: dict, pixel_values: torch.Tensor | None) -> None:
        for name, value in inputs.items():
            self.buffers[name].copy_(value)
        if self.pixel_values is not None:
            self.pixel_values.copy_(pixel_values)

    def __call__(self, cache) -> torch.Tensor:
        from ..modeling.compat import CACHE_KWARG

        base, b = self.model.model, self.buffers
        with torch.no_grad():
            cache.start_fresh_(b["start"])
            embeds = base.get_input_embeddings()(b["input_ids"])
            if self.grid is not None:
                features = base.vision_features(self.pixel_values, self.grid, **self.vision_kwargs)
                embeds.view(-1, embeds.shape[-1]).index_copy_(0, b["feature_slots"], features.to(embeds.dtype))
            hidden = base.language_model(
                inputs_embeds=embeds, position_ids=b["position_ids"], token_valid=b["token_valid"], use_cache=True,
                keep_last=1, **{CACHE_KWARG: cache},
            ).last_hidden_state
            return self.model.lm_head(hidden)
