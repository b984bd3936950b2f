"""`InfiniteVLCache`: the whole memory of an InfiniteVL decoder, of constant size.

One layer object per decoder layer, chosen by `config.layer_types`:

- attention layers keep a window of past keys/values (at most `window - 1` tokens: with the new
  token that makes `window`), plus which of those keys were padding;
- Gated DeltaNet layers keep the last `conv_size - 1` inputs of each of the three short
  convolutions (q, k, v) and the float32 recurrent state [B, H, d_k, d_v].

The cache also keeps the running mRoPE position of every row (`next_positions`) and the number of
tokens seen, so that positions continue correctly when a prompt is fed in chunks or a stream
frame by frame. Its size does not depend on how many tokens went through it once the window is
full: see `nbytes`.
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import Cache, DynamicLayer, LinearAttentionCacheLayerMixin

from .configuration_infinitevl import InfiniteVLConfig, InfiniteVLTextConfig


def _tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class InfiniteVLAttentionLayer(DynamicLayer):
    """Keys/values [B, H_kv, L, D] of one attention layer, with L <= window - 1 (unbounded when window is None)."""

    def __init__(self, window: int | None):
        super().__init__()
        self.window = window
        self.is_sliding = window is not None
        self.cumulative_length = 0
        self.valid: torch.Tensor | None = None  # [B, L] bool, False where the cached key is padding

    def update(self, key_states, value_states, *args, valid: torch.Tensor | None = None, **kwargs):
        """Append the new keys/values; return every key/value the new queries may attend to."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, _, new, _ = key_states.shape
        past = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        if valid is None:
            valid = torch.ones(batch, new, dtype=torch.bool, device=key_states.device)
        past_valid = self.valid if self.valid is not None else valid.new_ones(batch, past)
        full_keys = torch.cat([self.keys, key_states], dim=-2) if past else key_states
        full_values = torch.cat([self.values, value_states], dim=-2) if past else value_states
        full_valid = torch.cat([past_valid, valid], dim=-1)
        self.cumulative_length += new
        keep = full_keys.shape[-2] if self.window is None else min(full_keys.shape[-2], self.window - 1)
        start = full_keys.shape[-2] - keep
        # Cloning the kept tail lets the long prompt's tensors be freed: memory stays at the window.
        self.keys = full_keys[:, :, start:].clone() if start else full_keys
        self.values = full_values[:, :, start:].clone() if start else full_values
        self.valid = full_valid[:, start:].clone() if start else full_valid
        return full_keys, full_values

    def past_length(self) -> int:
        return self.keys.shape[-2] if self.is_initialized and self.keys.dim() == 4 else 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1 if self.window is None else self.window

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        query_length = args[0] if args and isinstance(args[0], int) else 1
        past = self.past_length()
        return past + query_length, self.cumulative_length - past

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0
        self.valid = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.past_length():
            super().reorder_cache(beam_idx)
            self.valid = self.valid.index_select(0, beam_idx.to(self.valid.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.past_length():
            super().batch_repeat_interleave(repeats)
            self.valid = self.valid.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.past_length():
            super().batch_select_indices(indices)
            self.valid = self.valid[indices]

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(_NO_ROLLBACK)

    @property
    def nbytes(self) -> int:
        return _tensor_bytes(self.keys, self.values, self.valid) if self.is_initialized else 0


class InfiniteVLLinearAttentionLayer(LinearAttentionCacheLayerMixin):
    """Gated DeltaNet state: conv states 0/1/2 (q/k/v, [B, D, conv_size - 1]) and recurrent state 0 ([B, H, d_k, d_v], fp32)."""

    def __init__(self):
        super().__init__(number_of_states=3)

    def lazy_initialization(self, conv_states=None, recurrent_states=None, state_idx: int = 0) -> None:
        for tensor in (conv_states, recurrent_states):
            if tensor is not None and self.device is None:
                self.device, self.dtype = tensor.device, tensor.dtype

    def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        self.lazy_initialization(conv_states=conv_states)
        self.conv_states[state_idx] = _store(self.conv_states[state_idx], conv_states)
        self.is_conv_states_initialized[state_idx] = True
        self.has_previous_state[state_idx] = True
        return self.conv_states[state_idx]

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        self.lazy_initialization(recurrent_states=recurrent_states)
        self.recurrent_states[state_idx] = _store(self.recurrent_states[state_idx], recurrent_states)
        self.is_recurrent_states_initialized[state_idx] = True
        return self.recurrent_states[state_idx]

    def get_seq_length(self) -> int:
        return 0

    def _apply(self, fn) -> None:
        for states, flags in ((self.conv_states, self.is_conv_states_initialized), (self.recurrent_states, self.is_recurrent_states_initialized)):
            for i in range(self.number_of_states):
                if flags[i]:
                    states[i] = fn(states[i])

    def reset(self) -> None:
        for states, flags in ((self.conv_states, self.is_conv_states_initialized), (self.recurrent_states, self.is_recurrent_states_initialized)):
            for i in range(self.number_of_states):
                states[i], flags[i] = None, False
            self.has_previous_state = dict.fromkeys(range(self.number_of_states), False)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(_NO_ROLLBACK)

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def nbytes(self) -> int:
        return _tensor_bytes(*self.conv_states.values(), *self.recurrent_states.values())


def _store(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    # In place when the shape is unchanged, so a captured CUDA graph keeps reading the same memory.
    if old is not None and old.shape == new.shape and old.dtype == new.dtype and old.device == new.device:
        return old.copy_(new)
    # A view would keep the whole tensor it was cut from alive.
    return new.clone() if new._base is not None else new


_NO_ROLLBACK = (
    "InfiniteVLCache cannot remove tokens: a Gated DeltaNet state folds every past token into a fixed-size "
    "matrix, so it cannot be rolled back (assisted decoding, DoLa and `crop` are not supported). "
    "Use `cache.fork()` before the tokens you may want to undo."
)


class InfiniteVLCache(Cache):
    """The memory of an InfiniteVL decoder: one layer object per decoder layer, plus the running position.

    Args:
        config: an [`InfiniteVLConfig`] or [`InfiniteVLTextConfig`]; `layer_types` picks each layer's kind.

    Attributes:
        next_positions (`torch.LongTensor` [B] or None): mRoPE position where each row continues.
        seen_tokens (`int`): tokens (padding included) fed through the cache so far.

    Example:

    ```python
    >>> cache = InfiniteVLCache(model.config)
    >>> out = model(**inputs, past_key_values=cache)  # `cache=` on transformers >= 5.24
    >>> cache.nbytes  # the same after 2 windows of input as after 20
    ```
    """

    def __init__(self, config: InfiniteVLConfig | InfiniteVLTextConfig, **kwargs):
        text_config = config.text_config if hasattr(config, "text_config") else config
        layers = [
            InfiniteVLLinearAttentionLayer()
            if kind == "linear_attention"
            else InfiniteVLAttentionLayer(text_config.window_for_layer(i))
            for i, kind in enumerate(text_config.layer_types)
        ]
        super().__init__(layers=layers)
        self.layer_types = list(text_config.layer_types)
        self.seen_tokens = 0
        self.next_positions: torch.LongTensor | None = None

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        layer_idx = args[1] if len(args) > 1 else kwargs.get("layer_idx", 0)
        return self.layers[layer_idx].get_mask_sizes(*args[:1])

    @property
    def nbytes(self) -> int:
        """Bytes held by every tensor of the cache (keys, values, padding flags, conv and recurrent states, positions)."""
        return sum(layer.nbytes for layer in self.layers) + _tensor_bytes(self.next_positions)

    def fork(self) -> InfiniteVLCache:
        """An independent copy: feeding the fork leaves this cache untouched."""
        return copy.deepcopy(self)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.seen_tokens = 0
        self.next_positions = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers:
            layer.reorder_cache(beam_idx)
        if self.next_positions is not None:
            self.next_positions = self.next_positions.index_select(0, beam_idx.to(self.next_positions.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for layer in self.layers:
            layer.batch_repeat_interleave(repeats)
        if self.next_positions is not None:
            self.next_positions = self.next_positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for layer in self.layers:
            layer.batch_select_indices(indices)
        if self.next_positions is not None:
            self.next_positions = self.next_positions[indices]

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(_NO_ROLLBACK)

    def activate_past_recording(self) -> None:
        raise ValueError(_NO_ROLLBACK)

    @property
    def is_compileable(self) -> bool:
        return False


__all__ = ["InfiniteVLCache", "InfiniteVLAttentionLayer", "InfiniteVLLinearAttentionLayer"]
