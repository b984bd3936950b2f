"""Checks of a call's vision inputs before any of them reaches the vision tower or the decoder.

Without them, placeholder tokens with no pixels are silently embedded as text, and a grid that does not cover
its pixel rows fails deep in the tower with a raw index or shape error.
"""

from __future__ import annotations

import torch


def check_vision_inputs(config, input_ids: torch.LongTensor | None, pixel_values, image_grid_thw,
                        pixel_values_videos, video_grid_thw, generated_step: bool = False) -> None:
    """Raise a ValueError naming the problem when images or videos and their placeholder tokens disagree.

    generated_step: the call feeds one generated token per row after a prompt; a model may generate any token id,
    placeholders included, so only given inputs are held to having pixels for their placeholders."""
    merge = config.vision_config.spatial_merge_size
    for kind, pixels, grid, token_id in (("image", pixel_values, image_grid_thw, config.image_token_id),
                                         ("video", pixel_values_videos, video_grid_thw, config.video_token_id)):
        if pixels is None:
            if input_ids is not None and not generated_step and bool((input_ids == token_id).any()):
                count = int((input_ids == token_id).sum())
                name = "pixel_values" if kind == "image" else "pixel_values_videos"
                raise ValueError(f"The input holds {count} {kind} placeholder tokens (id {token_id}) but no `{name}`: "
                                 f"pass the {kind}s, or leave their placeholders out of the text.")
            continue
        if grid is None:
            continue  # named by the caller
        if grid.dim() != 2 or grid.shape[-1] != 3 or bool((grid < 1).any()):
            raise ValueError(f"`{kind}_grid_thw` must be [n_{kind}s, 3] positive (t, h, w) patch counts, got {grid.tolist()}.")
        if bool((grid[:, 1:] % merge).any()):
            raise ValueError(f"`{kind}_grid_thw` {grid.tolist()}: h and w must be multiples of the merge size {merge}.")
        rows = int(grid.prod(dim=-1).sum())
        if pixels.dim() != 2 or pixels.shape[0] != rows:
            raise ValueError(f"The {kind} grids {grid.tolist()} cover {rows} patch rows, but the {kind} pixel values have "
                             f"shape {list(pixels.shape)}: grid and pixels come from different inputs.")


__all__ = ["check_vision_inputs"]
