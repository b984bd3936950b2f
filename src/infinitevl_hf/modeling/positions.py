"""Multimodal rotary positions (mRoPE) of Qwen2.5-VL, continued across calls.

Text tokens advance all three axes (time, height, width) by one. The tokens of one image or video
take a (t, h, w) grid of positions starting at the running position, and the text after them
continues one past the largest of those positions, as in the official release (transformers 5.2x
continues videos at `start + max(h, w)` instead; for images both rules agree). Unlike transformers' `get_rope_index`, the start of
every row is an argument, so a prompt split into chunks, a stream of frames fed call by call and
one prompt holding everything all get the same positions.
"""

from __future__ import annotations

import torch


def num_vision_tokens(grid_thw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """Placeholder tokens one image/video grid takes in the text: `t * h * w // merge_size**2`.

    The processor and the model both use this formula, so prompt and features always agree.
    """
    return grid_thw.prod(-1) // (merge_size**2)


def mrope_position_ids(
    input_ids: torch.LongTensor,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
    tokens_per_second: float,
    image_grid_thw: torch.LongTensor | None = None,
    video_grid_thw: torch.LongTensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    start_positions: torch.LongTensor | None = None,
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """3-D positions for `input_ids` [B, T].

    Args:
        image_grid_thw / video_grid_thw: [N, 3] grids, in the order their placeholder runs appear
            (row by row). Each run of `t*h*w/merge**2` placeholder tokens consumes one grid.
        second_per_grid_ts: [N_videos] seconds per temporal grid step (default 1.0).
        attention_mask: [B, T]; 0 marks padding, which gets position 1 and does not advance.
        start_positions: [B] running position of each row (default 0).

    Returns:
        position_ids [3, B, T] and next_positions [B] (where the next token of each row continues).
    """
    batch, length = input_ids.shape
    device = input_ids.device
    starts = (
        torch.zeros(batch, dtype=torch.long) if start_positions is None else start_positions.detach().to("cpu", torch.long)
    )
    ids = input_ids.detach().to("cpu")
    valid = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.detach().to("cpu").bool()
    positions = torch.ones(3, batch, length, dtype=torch.long)
    next_positions = torch.empty(batch, dtype=torch.long)
    grids = {
        image_token_id: iter(image_grid_thw.tolist()) if image_grid_thw is not None else iter(()),
        video_token_id: iter(video_grid_thw.tolist()) if video_grid_thw is not None else iter(()),
    }
    seconds = iter(second_per_grid_ts.tolist()) if second_per_grid_ts is not None else None
    for row in range(batch):
        current = int(starts[row])
        tokens, keep = ids[row].tolist(), valid[row].tolist()
        t = 0
        while t < length:
            token = tokens[t]
            if not keep[t]:
                t += 1
                continue
            if token not in grids:
                # A run of text: one vectorised assignment.
                end = t
                while end < length and keep[end] and tokens[end] not in grids:
                    end += 1
                positions[:, row, t:end] = torch.arange(current, current + end - t)
                current += end - t
                t = end
                continue
            grid = next(grids[token], None)
            if grid is None:
                kind = "image" if token == image_token_id else "video"
                raise ValueError(f"Row {row} has more {kind} placeholder runs than {kind} grids were given.")
            gt, gh, gw = grid[0], grid[1] // spatial_merge_size, grid[2] // spatial_merge_size
            count = gt * gh * gw
            if tokens[t : t + count] != [token] * count:
                raise ValueError(
                    f"Row {row}: a grid of {gt}x{gh}x{gw} needs {count} consecutive placeholder tokens at index {t}."
                )
            step = 1.0
            if token == video_token_id:
                per_grid = next(seconds, 1.0) if seconds is not None else 1.0
                step = tokens_per_second * per_grid
            tpos = (torch.arange(gt, dtype=torch.float64) * step).long().view(-1, 1, 1).expand(gt, gh, gw)
            hpos = torch.arange(gh).view(1, -1, 1).expand(gt, gh, gw)
            wpos = torch.arange(gw).view(1, 1, -1).expand(gt, gh, gw)
            positions[:, row, t : t + count] = torch.stack([tpos, hpos, wpos]).reshape(3, -1) + current
            current += max(int(tpos.max()), gh - 1, gw - 1) + 1
            t += count
        next_positions[row] = current
    return positions.to(device), next_positions.to(device)


def packed_mrope_position_ids(
    input_ids: torch.LongTensor,
    cu_seqlens: torch.LongTensor,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
    image_grid_thw: torch.LongTensor | None = None,
    video_grid_thw: torch.LongTensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
    **kwargs,
) -> torch.LongTensor:
    """3-D positions [3, 1, T] of sequences packed in one row (`input_ids` [1, T], boundaries `cu_seqlens`):
    each sequence starts at 0 and takes, in order, the grids its placeholder tokens need."""
    ids = input_ids.detach().to("cpu")
    bounds = cu_seqlens.tolist()
    used = {"image": 0, "video": 0, "seconds": 0}
    pieces = []
    for bos, eos in zip(bounds[:-1], bounds[1:]):
        segment = ids[:, bos:eos]
        grids = {}
        for kind, token, all_grids in (("image", image_token_id, image_grid_thw), ("video", video_token_id, video_grid_thw)):
            need, take = int((segment == token).sum()), used[kind]
            while need > 0 and all_grids is not None and take < all_grids.shape[0]:
                need -= int(num_vision_tokens(all_grids[take], spatial_merge_size))
                take += 1
            if need != 0:
                raise ValueError(f"The packed sequence at [{bos}, {eos}) has {kind} tokens that the {kind} grids do not match.")
            grids[kind] = all_grids[used[kind]:take] if take > used[kind] else None
            used[kind] = take
        seconds = None
        if second_per_grid_ts is not None and grids["video"] is not None:
            seconds = second_per_grid_ts[used["seconds"]: used["seconds"] + grids["video"].shape[0]]
            used["seconds"] += grids["video"].shape[0]
        positions, _ = mrope_position_ids(
            segment, image_token_id=image_token_id, video_token_id=video_token_id,
            spatial_merge_size=spatial_merge_size, image_grid_thw=grids["image"], video_grid_thw=grids["video"],
            second_per_grid_ts=seconds, **kwargs,
        )
        pieces.append(positions)
    return torch.cat(pieces, dim=-1).to(input_ids.device)
