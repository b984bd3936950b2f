"""Model outputs carrying the vision tower's outputs beside the decoder's, as transformers 5 VLMs return them.

Defined here rather than taken from transformers: its `Multimodal*OutputWithPast` classes are newer than the
oldest transformers this package supports (5.17), and the cache field is named as the installed version names it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    BaseModelOutputWithPooling,
    CausalLMOutputWithPast,
)


@dataclass
class InfiniteVLModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    `BaseModelOutputWithPast` of the decoder plus:

    image_outputs (`BaseModelOutputWithPooling`, *optional*): the vision tower's output for `pixel_values`
        (`pooler_output`: one tensor of merged features per image); None when no image was given.
    video_outputs (`BaseModelOutputWithPooling`, *optional*): the same for `pixel_values_videos`.
    """

    image_outputs: BaseModelOutputWithPooling | None = None
    video_outputs: BaseModelOutputWithPooling | None = None


@dataclass
class InfiniteVLCausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    `CausalLMOutputWithPast` plus the vision tower's outputs (`image_outputs`, `video_outputs`, see
    [`InfiniteVLModelOutputWithPast`]). `attentions` holds one entry per decoder layer: the sliding-window
    layers' weights (eager attention) and None for the Gated DeltaNet layers, which have no attention matrix.
    """

    image_outputs: BaseModelOutputWithPooling | None = None
    video_outputs: BaseModelOutputWithPooling | None = None


def hidden_state_selection(output_hidden_states: bool | int | list[int] | None, count: int) -> set[int] | None:
    """The hidden-state indices (of `count`: the embeddings and each layer's output) that `output_hidden_states`
    asks for: all for True, the listed ones for an index or a list (negative ones counted from the end), None
    for False/None."""
    if output_hidden_states is None or output_hidden_states is False:
        return None
    if output_hidden_states is True:
        return set(range(count))
    indices = [output_hidden_states] if isinstance(output_hidden_states, int) else list(output_hidden_states)
    for index in indices:
        if not -count <= index < count:
            raise IndexError(f"output_hidden_states index {index} is out of range for {count} hidden states.")
    return {index % count for index in indices}


def select_tensors(selected: set[int] | None, tensors: list[torch.Tensor | None]) -> tuple | None:
    """`tensors` as a tuple with None where not selected, or None when nothing was asked for."""
    if selected is None:
        return None
    return tuple(t if i in selected else None for i, t in enumerate(tensors))
