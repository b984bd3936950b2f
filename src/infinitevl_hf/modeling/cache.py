"""`InfiniteVLCache`: the whole memory of an InfiniteVL decoder, of constant size.

One layer object per decoder layer, chosen by `config.layer_types`:

- attention layers keep a window of past keys/values (at most `window - 1` tokens: with the new
  token that makes `window`), plus which of those keys were padding;
- Gated DeltaNet layers keep the last `conv_size - 1` inputs of each of the three short
  convolutions (q, k, v) and the float32 recurrent state [B, H, d_k, d_v].

The cache also keeps the running mRoPE position of every row (`next_positions`) and the number of
tokens seen, so that positions continue correctly when a prompt is fed in chunks or a stream
frame by frame. Its size does not depend on how many tokens went through it once the window is
full: see `nbytes`. `state_dict()` / `from_state_dict()` turn it into plain counters and tensors and
back (each layer class owns its part), checking a state field by field before it is used.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, DynamicLayer, LinearAttentionCacheLayerMixin

from .configuration_infinitevl import InfiniteVLConfig, InfiniteVLTextConfig
from .state_checks import FLOAT_DTYPES, MAX_COUNT, check_count, check_tensor, refuse_extra


class AttentionKeys(NamedTuple):
    """What an attention layer's cache update hands its attention call (`attention_paths.attend`).

    keys/values: [B, H_kv, past_length + T, D], the cached keys followed by the chunk's own. in_token_order:
    the cached ones oldest first (a dynamic window, or a ring read in order); False: a ring in slot order, whose
    `visible` [B, 1, T, window + T] mask (a chunk) or `past_valid` flags (one token) say what each query sees.
    past_valid: [B, past_length] (False: padding or a slot never written; None: every cached key holds a
    token, or, for a ring in token order, the window is known full). key_valid: [B, past_length + T] flags of a
    ring read in token order (or of a padded chunk over an empty ring: past_length 0), else None."""

    keys: torch.Tensor
    values: torch.Tensor
    past_length: int
    past_valid: torch.Tensor | None = None
    in_token_order: bool = True
    key_valid: torch.Tensor | None = None
    visible: torch.Tensor | None = None


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
        """Append the new keys/values; return every key/value the new queries may attend to.

        `valid` [B, T] marks padding (False); `self.valid` stays None until some padding was seen, so
        unpadded inputs never need a host sync to check it."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, _, new, _ = key_states.shape
        past = self.past_length()
        full_keys = torch.cat([self.keys, key_states], dim=-2) if past else key_states
        full_values = torch.cat([self.values, value_states], dim=-2) if past else value_states
        full_valid = None
        if valid is not None or self.valid is not None:
            past_valid = self.valid if self.valid is not None else torch.ones(batch, past, dtype=torch.bool, device=key_states.device)
            new_valid = valid if valid is not None else torch.ones(batch, new, dtype=torch.bool, device=key_states.device)
            full_valid = torch.cat([past_valid, new_valid], dim=-1)
        self.cumulative_length += new
        keep = full_keys.shape[-2] if self.window is None else min(full_keys.shape[-2], self.window - 1)
        start = full_keys.shape[-2] - keep
        # Cloning the kept tail lets the long prompt's tensors be freed: memory stays at the window.
        self.keys = full_keys[:, :, start:].clone() if start else full_keys
        self.values = full_values[:, :, start:].clone() if start else full_values
        if full_valid is not None:
            self.valid = full_valid[:, start:].clone() if start else full_valid
        return full_keys, full_values

    def attention_keys(self, key_states, value_states, valid=None, token_order=False, window_full=False) -> AttentionKeys:
        """`update`, with what the attention call needs to know of the cached keys (always in token order)."""
        past_valid, past = self.valid, self.past_length()
        keys, values = self.update(key_states, value_states, valid=valid)
        return AttentionKeys(keys, values, past, past_valid)

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
            if self.valid is not None:
                self.valid = self.valid.index_select(0, beam_idx.to(self.valid.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.past_length():
            super().batch_repeat_interleave(repeats)
            if self.valid is not None:
                self.valid = self.valid.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.past_length():
            super().batch_select_indices(indices)
            if self.valid is not None:
                self.valid = self.valid[indices]

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(_NO_ROLLBACK)

    @property
    def nbytes(self) -> int:
        return _tensor_bytes(self.keys, self.values, self.valid) if self.is_initialized else 0

    # -- state (the layer's part of `InfiniteVLCache.state_dict`) ------------------------------------------------
    def state_dict(self, prefix: str = "") -> tuple[dict, dict[str, torch.Tensor]]:
        """(record, tensors): record `{"kind": "attention", "cumulative_length": int, "initialized": bool}`; once
        initialized, tensors `{prefix}keys` and `{prefix}values` [B, H_kv, L, D] and, once padding was seen,
        `{prefix}valid` [B, L] bool (contiguous CPU copies)."""
        record = {"kind": "attention", "cumulative_length": self.cumulative_length, "initialized": self.is_initialized}
        tensors = {}
        if self.is_initialized:
            tensors[f"{prefix}keys"], tensors[f"{prefix}values"] = _saved(self.keys), _saved(self.values)
            if self.valid is not None:
                tensors[f"{prefix}valid"] = _saved(self.valid)
        return record, tensors

    @staticmethod
    def check_state_dict(text_config: InfiniteVLTextConfig, index: int, record: dict, tensors: dict,
                         batch: int | None, seen: int) -> set[str]:
        """Check layer `index`'s record and tensors against the config; return the names of its tensors."""
        if record.get("kind") != "attention":
            raise ValueError(f"Saved layer {index} is {record.get('kind')}, the model's is attention.")
        cumulative = check_count(record.get("cumulative_length"), f"layers[{index}].cumulative_length", high=seen)
        if not isinstance(record.get("initialized"), bool):
            raise ValueError(f"The saved state's layers[{index}].initialized must be true or false.")
        if not record["initialized"]:
            return set()
        prefix, window = _prefix(index), text_config.window_for_layer(index)
        head_dim = text_config.hidden_size // text_config.num_attention_heads
        keys = check_tensor(tensors, f"{prefix}keys", (batch, text_config.num_key_value_heads, None, head_dim), FLOAT_DTYPES)
        length = keys.shape[2]
        if length > cumulative or (window is not None and length > window - 1):
            raise ValueError(f"The saved state's tensor '{prefix}keys' holds {length} tokens; layer {index} keeps at "
                             f"most {min(cumulative, (window or cumulative + 1) - 1)}.")
        check_tensor(tensors, f"{prefix}values", tuple(keys.shape), FLOAT_DTYPES)
        names = {f"{prefix}keys", f"{prefix}values"}
        if f"{prefix}valid" in tensors:
            check_tensor(tensors, f"{prefix}valid", (batch, length), (torch.bool,))
            names.add(f"{prefix}valid")
        return names

    def load_state_dict(self, record: dict, tensors: dict, prefix: str = "", device=None, dtype=None) -> None:
        """Fill this fresh layer from a checked record and tensors (keys/values in `dtype` when given)."""
        self.cumulative_length = record["cumulative_length"]
        if record["initialized"]:
            keys, values = _loaded(tensors[f"{prefix}keys"], device, dtype), _loaded(tensors[f"{prefix}values"], device, dtype)
            self.lazy_initialization(keys, values)
            self.keys, self.values, self.dtype = keys, values, keys.dtype
            valid = tensors.get(f"{prefix}valid")
            self.valid = None if valid is None else _loaded(valid, device)


class InfiniteVLRingAttentionLayer(DynamicLayer):
    """Preallocated window ring for decoding with static shapes (CUDA graphs).

    `keys`/`values` [B, H_kv, window, D] and `valid` [B, window]: the token with absolute index n lives
    in slot n % window, written before its query attends, so attending over the whole ring is exactly
    "itself and the window - 1 tokens before it". Keys are stored after RoPE, so slot order is irrelevant.
    """

    is_sliding = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, step: torch.Tensor,
                 chunk_masks: dict | None = None):
        super().__init__()
        self.keys, self.values, self.valid = keys, values, valid
        self.window = keys.shape[-2]
        self.step = step  # shared [1] long on device: absolute index of the next token
        # Shared by the rings of one cache and emptied after each decoder call: every ring of a window holds the same
        # slots and flags, so the first layer of a call builds the chunk mask and the others reuse it.
        self.chunk_masks = {} if chunk_masks is None else chunk_masks
        self.is_initialized = True
        self.device = keys.device
        # Known on the host to hold no token: set by `InfiniteVLCache.start_fresh_` (a captured prompt's fresh
        # start), cleared by every write. A chunk then attends to its own keys only (`attention_keys`).
        self.empty = False

    @classmethod
    def from_window(cls, layer: InfiniteVLAttentionLayer, batch: int, step: torch.Tensor, like: torch.Tensor,
                    chunk_masks: dict | None = None):
        """Lay the last tokens of a dynamic window layer into a ring (token n -> slot n % window)."""
        window, seen = layer.window, layer.cumulative_length
        shape = (batch, like.shape[1], window, like.shape[-1])
        keys = torch.zeros(shape, dtype=like.dtype, device=like.device)
        values = torch.zeros_like(keys)
        valid = torch.zeros(batch, window, dtype=torch.bool, device=like.device)
        past = layer.past_length()
        if past:
            slots = torch.arange(seen - past, seen, device=like.device) % window
            keys[:, :, slots] = layer.keys
            values[:, :, slots] = layer.values
            valid[:, slots] = True if layer.valid is None else layer.valid
        return cls(keys, values, valid, step, chunk_masks)

    def update(self, key_states, value_states, *args, valid: torch.Tensor | None = None, **kwargs):
        """One token: write it, then attend over the ring. A chunk of T <= window tokens: return the ring
        followed by the chunk (with `self.chunk_mask` [B, 1, T, window + T] saying what each query may see),
        then write the chunk into its slots. Everything stays on the device (no host syncs)."""
        length = key_states.shape[-2]
        if length == 1:
            slot = self.step % self.window
            self.keys.index_copy_(2, slot, key_states)
            self.values.index_copy_(2, slot, value_states)
            self.valid.index_fill_(1, slot, True) if valid is None else self.valid.index_copy_(1, slot, valid)
            self.empty = False
            return self.keys, self.values
        device = key_states.device
        new_valid = self._chunk_flags(key_states, valid)
        keys = torch.cat([self.keys, key_states], dim=2)  # copies: the write below does not touch them
        values = torch.cat([self.values, value_states], dim=2)
        mask_key = (self.window, length, None if valid is None else id(valid))
        self.chunk_mask = self.chunk_masks.get(mask_key)
        if self.chunk_mask is None:
            offsets = torch.arange(length, device=device)
            slots = torch.arange(self.window, device=device)
            newest = self.step - 1 - torch.remainder(self.step - 1 - slots, self.window)  # token held by each slot
            in_window = (self.step + offsets)[:, None] - newest[None, :] < self.window  # [T, window]
            ring_visible = self.valid[:, None, :] & in_window[None]
            causal = offsets[None, :] <= offsets[:, None]
            chunk_visible = (causal[None] & new_valid[:, None, :]) | torch.eye(length, dtype=torch.bool, device=device)[None]
            self.chunk_mask = self.chunk_masks[mask_key] = torch.cat([ring_visible, chunk_visible], dim=-1)[:, None]
        self._write_chunk(key_states, value_states, new_valid)
        return keys, values

    def update_in_order(self, key_states, value_states, valid: torch.Tensor | None = None):
        """A chunk of T <= window tokens: return the `window - 1` tokens before it, oldest first, followed by the
        chunk ([B, H_kv, window - 1 + T, D] keys and values, and [B, window - 1 + T] flags: False on padding and
        on slots never written), then write the chunk into its slots. In token order the chunk's mask is the
        plain sliding window, so it can be a static block mask. No host syncs."""
        device = key_states.device
        new_valid = self._chunk_flags(key_states, valid)
        # tokens step - window + 1 ... step - 1 live in slots (step + 1 + i) % window
        order = torch.remainder(self.step + 1 + torch.arange(self.window - 1, device=device), self.window)
        keys = torch.cat([self.keys.index_select(2, order), key_states], dim=2)
        values = torch.cat([self.values.index_select(2, order), value_states], dim=2)
        flags = torch.cat([self.valid.index_select(1, order), new_valid], dim=1)
        self._write_chunk(key_states, value_states, new_valid)
        return keys, values, flags

    def attention_keys(self, key_states, value_states, valid=None, token_order=False, window_full=False) -> AttentionKeys:
        """`update_in_order` when the attention asks for token order (a long chunk; `window_full`: every slot
        known to hold a token, so the cached keys need no flags), else `update` (the ring in slot order). A chunk
        over a ring known to be empty (a captured prompt's fresh start) attends to its own keys only: no cached
        key is visible, so the window of empty slots is neither read nor masked (the chunk is written into its
        slots all the same); key_valid is then the chunk's flags where it has padding."""
        if self.empty and key_states.shape[-2] > 1:
            new_valid = self._chunk_flags(key_states, valid)
            self._write_chunk(key_states, value_states, new_valid)
            return AttentionKeys(key_states, value_states, 0, None, True, valid)
        if token_order:
            keys, values, flags = self.update_in_order(key_states, value_states, valid=valid)
            past = self.window - 1
            return AttentionKeys(keys, values, past, None if window_full else flags[:, :past], True, flags)
        keys, values = self.update(key_states, value_states, valid=valid)
        visible = self.chunk_mask if key_states.shape[-2] > 1 else None
        return AttentionKeys(keys, values, self.window, self.valid, False, None, visible)

    def _chunk_flags(self, key_states: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """[B, T] validity of a chunk of T <= window new tokens (all True without padding)."""
        batch, _, length, _ = key_states.shape
        if length > self.window:
            raise ValueError(
                f"A static (ring) InfiniteVLCache takes at most window={self.window} tokens per call, got {length}."
            )
        return torch.ones(batch, length, dtype=torch.bool, device=key_states.device) if valid is None else valid

    def _write_chunk(self, key_states: torch.Tensor, value_states: torch.Tensor, valid: torch.Tensor) -> None:
        """Write a chunk's keys, values and flags into its slots: token n goes to slot n % window."""
        write = torch.remainder(self.step + torch.arange(key_states.shape[-2], device=key_states.device), self.window)
        self.keys.index_copy_(2, write, key_states)
        self.values.index_copy_(2, write, value_states)
        self.valid.index_copy_(1, write, valid)
        self.empty = False

    def to_window_layer(self, seen: int) -> InfiniteVLAttentionLayer:
        """The same keys as a dynamic window layer (oldest first, the last `window - 1` tokens)."""
        layer = InfiniteVLAttentionLayer(self.window)
        keep = min(seen, self.window - 1)
        layer.cumulative_length = seen
        if keep:
            slots = torch.arange(seen - keep, seen, device=self.keys.device) % self.window
            layer.lazy_initialization(self.keys, self.values)
            layer.keys, layer.values = self.keys[:, :, slots].clone(), self.values[:, :, slots].clone()
            valid = self.valid[:, slots]
            layer.valid = None if bool(valid.all()) else valid.clone()
        return layer

    def past_length(self) -> int:
        return self.window

    def get_seq_length(self) -> int:
        return int(self.step)

    def get_max_length(self) -> int:
        return self.window

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.window, 0

    def reset(self) -> None:
        self.keys.zero_()
        self.values.zero_()
        self.valid.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for name in ("keys", "values", "valid"):
            getattr(self, name).copy_(getattr(self, name).index_select(0, beam_idx.to(self.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for name in ("keys", "values", "valid"):
            setattr(self, name, getattr(self, name).repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for name in ("keys", "values", "valid"):
            setattr(self, name, getattr(self, name)[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(_NO_ROLLBACK)

    @property
    def nbytes(self) -> int:
        return _tensor_bytes(self.keys, self.values, self.valid)

    def state_dict(self, prefix: str = "") -> tuple[dict, dict[str, torch.Tensor]]:
        """The state of the dynamic window layer holding the same tokens (`to_window_layer`): a ring saves as its
        dynamic equivalent, so every state loads into a dynamic cache whatever the cache was when saved."""
        return self.to_window_layer(int(self.step)).state_dict(prefix)


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
                    states[i] = _store(states[i], fn(states[i]))

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

    # -- state (the layer's part of `InfiniteVLCache.state_dict`) ------------------------------------------------
    def state_dict(self, prefix: str = "") -> tuple[dict, dict[str, torch.Tensor]]:
        """(record, tensors): record `{"kind": "linear_attention", "has_previous_state": [bool, bool, bool]}`;
        tensors `{prefix}conv.{j}` [B, C_j, conv_size - 1] (j = 0, 1, 2: q, k, v) and `{prefix}recurrent.0`
        [B, H, d_k, d_v] float32, those that are set (contiguous CPU copies)."""
        record = {"kind": "linear_attention",
                  "has_previous_state": [bool(self.has_previous_state[j]) for j in range(self.number_of_states)]}
        tensors = {}
        for j in range(self.number_of_states):
            if self.conv_states[j] is not None:
                tensors[f"{prefix}conv.{j}"] = _saved(self.conv_states[j])
            if self.recurrent_states[j] is not None:
                tensors[f"{prefix}recurrent.{j}"] = _saved(self.recurrent_states[j])
        return record, tensors

    @staticmethod
    def check_state_dict(text_config: InfiniteVLTextConfig, index: int, record: dict, tensors: dict,
                         batch: int | None, seen: int) -> set[str]:
        """Check layer `index`'s record and tensors against the config; return the names of its tensors."""
        if record.get("kind") != "linear_attention":
            raise ValueError(f"Saved layer {index} is {record.get('kind')}, the model's is linear_attention.")
        flags = record.get("has_previous_state")
        if not isinstance(flags, list) or len(flags) != 3 or not all(isinstance(f, bool) for f in flags):
            raise ValueError(f"The saved state's layers[{index}].has_previous_state must be three true/false flags.")
        if not seen:
            return set()
        text, prefix, names = text_config, _prefix(index), set()
        if text.use_short_conv:
            key_dim, value_dim = text.num_linear_heads * text.linear_head_dim, text.num_linear_heads * text.linear_value_head_dim
            for j, channels in enumerate((key_dim, key_dim, value_dim)):
                check_tensor(tensors, f"{prefix}conv.{j}", (batch, channels, text.conv_size - 1), FLOAT_DTYPES)
                names.add(f"{prefix}conv.{j}")
        shape = (batch, text.num_linear_heads, text.linear_head_dim, text.linear_value_head_dim)
        check_tensor(tensors, f"{prefix}recurrent.0", shape, (torch.float32,))
        return names | {f"{prefix}recurrent.0"}

    def load_state_dict(self, record: dict, tensors: dict, prefix: str = "", device=None, dtype=None) -> None:
        """Fill this fresh layer from a checked record and tensors (conv states in `dtype` when given; the
        recurrent state stays float32)."""
        for j in range(self.number_of_states):
            conv, recurrent = tensors.get(f"{prefix}conv.{j}"), tensors.get(f"{prefix}recurrent.{j}")
            if conv is not None:
                self.update_conv_state(_loaded(conv, device, dtype), state_idx=j)
            if recurrent is not None:
                self.update_recurrent_state(_loaded(recurrent, device), state_idx=j)
            self.has_previous_state[j] = record["has_previous_state"][j]


def _layer_tensors(layer) -> list[torch.Tensor]:
    """The state tensors of one cache layer, in a fixed order."""
    if isinstance(layer, InfiniteVLLinearAttentionLayer):
        return [layer.conv_states[i] for i in range(layer.number_of_states) if layer.is_conv_states_initialized[i]] + [
            layer.recurrent_states[i] for i in range(layer.number_of_states) if layer.is_recurrent_states_initialized[i]
        ]
    if isinstance(layer, InfiniteVLRingAttentionLayer):
        return [layer.keys, layer.values, layer.valid]
    return [t for t in (layer.keys, layer.values, layer.valid) if isinstance(t, torch.Tensor)]


def _deepcopy_state(obj, tensors: list[torch.Tensor]):
    """`copy.deepcopy(obj)`, with `tensors` (the state tensors inside it) cloned by one batched copy rather than one
    deepcopy each: copying a cache's ~150 state tensors one by one cost milliseconds of host time at the end of every
    `generate()` call. Only where each tensor is its whole storage (so no other tensor can be a view into it) and
    none is part of an autograd graph; else plain deepcopy, which keeps views as views (and refuses graph tensors)."""
    unique = list({id(t): t for t in tensors}.values())
    storages = {t.untyped_storage().data_ptr() for t in unique}
    if len(storages) != len(unique) or any(
        not t.is_contiguous() or t.storage_offset() or t.untyped_storage().nbytes() != t.numel() * t.element_size()
        or type(t) is not torch.Tensor or t.requires_grad for t in unique
    ):
        return copy.deepcopy(obj)
    clones = [torch.empty_like(t) for t in unique]
    groups: dict[tuple, tuple[list, list]] = {}  # one copy kernel per (device, dtype): foreach needs them alike
    for t, clone in zip(unique, clones):
        sources, targets = groups.setdefault((t.device, t.dtype), ([], []))
        sources.append(t)
        targets.append(clone)
    for sources, targets in groups.values():
        torch._foreach_copy_(targets, sources)
    return copy.deepcopy(obj, {id(t): clone for t, clone in zip(unique, clones)})


def _prefix(index: int) -> str:
    """Name prefix of layer `index`'s tensors in a cache state."""
    return f"layers.{index}."


def _saved(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy: a state shares no memory with the cache it came from."""
    return tensor.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)


def _loaded(tensor: torch.Tensor, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A copy on `device` in `dtype` (each kept when None): a cache shares no memory with the state it came from."""
    return tensor.to(device=device if device is not None else tensor.device, dtype=dtype or tensor.dtype, copy=True)


def _store(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    if new is old:  # the kernel wrote the state in place (`state_in_place`)
        return old
    if new.requires_grad:  # a differentiable step: the old state may be saved for its backward, and the new keeps
        return new  # its history
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
        padded_through (`int`): `seen_tokens` at the end of the last call that had padding (0 if none had).

    Example:

    ```python
    >>> cache = InfiniteVLCache(model.config)
    >>> out = model(**inputs, past_key_values=cache)  # `cache=` on transformers >= 5.24
    >>> cache.nbytes  # the same after 2 windows of input as after 20
    ```
    """

    def __init__(self, config: InfiniteVLConfig | InfiniteVLTextConfig, **kwargs):
        text_config = config.text_config if hasattr(config, "text_config") else config
        self.layer_types = list(text_config.layer_types)
        self._windows = [
            None if kind == "linear_attention" else text_config.window_for_layer(i)
            for i, kind in enumerate(text_config.layer_types)
        ]
        super().__init__(layers=self._fresh_layers())
        self.layer_types = list(text_config.layer_types)
        self.seen_tokens = 0
        self.padded_through = 0
        self.next_positions: torch.LongTensor | None = None
        self.device_step: torch.LongTensor | None = None  # set by `to_static`
        self.chunk_masks: dict = {}  # the rings' mask of the current call (see InfiniteVLRingAttentionLayer)

    def _fresh_layers(self) -> list:
        return [
            InfiniteVLLinearAttentionLayer() if kind == "linear_attention" else InfiniteVLAttentionLayer(window)
            for kind, window in zip(self.layer_types, self._windows)
        ]

    def check_compatible(self, config: InfiniteVLConfig | InfiniteVLTextConfig) -> None:
        """Raise a ValueError naming the mismatch when this cache was built for another layer list or window."""
        text_config = config.text_config if hasattr(config, "text_config") else config
        windows = [None if kind == "linear_attention" else text_config.window_for_layer(i)
                   for i, kind in enumerate(text_config.layer_types)]
        if self.layer_types != list(text_config.layer_types) or self._windows != windows:
            raise ValueError(
                f"This InfiniteVLCache was built for another model config (layer_types {self.layer_types}, windows "
                f"{self._windows}); the model has layer_types {list(text_config.layer_types)}, windows {windows}. "
                "Build the cache with InfiniteVLCache(model.config)."
            )

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

    @classmethod
    def empty_static(cls, config: InfiniteVLConfig | InfiniteVLTextConfig, batch: int, dtype: torch.dtype,
                     device: torch.device | str) -> InfiniteVLCache:
        """A static cache that nothing went through yet: empty rings (every slot flagged invalid), zero Gated
        DeltaNet states (what a fresh sequence starts from), positions at 0. Feeding it a prompt equals feeding
        a fresh dynamic cache, with static shapes from the first token on (what a captured prompt needs)."""
        text = config.text_config if hasattr(config, "text_config") else config
        cache = cls(config)
        device = torch.device(device)
        cache.device_step = torch.zeros(1, dtype=torch.long, device=device)
        cache.next_positions = torch.zeros(batch, dtype=torch.long, device=device)
        head_dim = text.hidden_size // text.num_attention_heads
        key_dim = text.num_linear_heads * text.linear_head_dim
        value_dim = text.num_linear_heads * text.linear_value_head_dim
        for i, (kind, window) in enumerate(zip(cache.layer_types, cache._windows)):
            if kind == "linear_attention":
                layer = cache.layers[i]
                for idx, width in enumerate((key_dim, key_dim, value_dim)):
                    layer.update_conv_state(torch.zeros(batch, width, text.conv_size - 1, dtype=dtype, device=device), idx)
                layer.update_recurrent_state(torch.zeros(batch, text.num_linear_heads, text.linear_head_dim,
                                                         text.linear_value_head_dim, dtype=torch.float32, device=device))
                continue
            if window is None:
                raise ValueError(f"Layer {i} is full attention: its cache grows with the input and cannot be static.")
            keys = torch.zeros(batch, text.num_key_value_heads, window, head_dim, dtype=dtype, device=device)
            valid = torch.zeros(batch, window, dtype=torch.bool, device=device)
            cache.layers[i] = InfiniteVLRingAttentionLayer(keys, torch.zeros_like(keys), valid, cache.device_step,
                                                           cache.chunk_masks)
        return cache

    # -- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything the cache holds, as plain data: counters and per-layer records (JSON-able) and tensors.

        ```
        {"seen_tokens": int, "padded_through": int,
         "layers": [one record per layer: {"kind": "attention", "cumulative_length": int, "initialized": bool}
                                       or {"kind": "linear_attention", "has_previous_state": [bool, bool, bool]}],
         "tensors": {"next_positions": [B] int64                         (once a token went through),
                     "layers.{i}.keys", "layers.{i}.values": [B, H_kv, L, D]  (L <= window - 1),
                     "layers.{i}.valid": [B, L] bool                      (once padding was seen),
                     "layers.{i}.conv.{j}": [B, C_j, conv_size - 1]      (j = 0, 1, 2: q, k, v),
                     "layers.{i}.recurrent.0": [B, H, d_k, d_v] float32}}
        ```

        Tensors are contiguous CPU copies: feeding the cache afterwards leaves the state as it was. A static
        cache saves as its dynamic equivalent (the rings' tokens oldest first) and stays static. Everything but
        `tensors` is what a saved stream's `session.json` holds (`stream_state`); `from_state_dict` reads it back.
        """
        layers, tensors = [], {}
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, (InfiniteVLAttentionLayer, InfiniteVLRingAttentionLayer, InfiniteVLLinearAttentionLayer)):
                raise ValueError(f"Cache layer {i} ({type(layer).__name__}) cannot be saved.")
            record, own = layer.state_dict(_prefix(i))
            layers.append(record)
            tensors.update(own)
        if self.next_positions is not None:
            tensors["next_positions"] = _saved(self.next_positions)
        return {"seen_tokens": self.seen_tokens, "padded_through": self.padded_through, "layers": layers, "tensors": tensors}

    @staticmethod
    def check_state_dict(config: InfiniteVLConfig | InfiniteVLTextConfig, state: dict) -> None:
        """Check a state (`state_dict()`'s form) against `config` before anything uses it: every counter, the layer
        kinds, every tensor's presence, shape, dtype and values, and nothing extra. Raises a ValueError naming the
        field. A state without `padded_through` (written before it was kept) counts as padded through its end."""
        if not isinstance(state, dict) or not isinstance(state.get("tensors"), dict):
            raise ValueError("A cache state is a dict with counters, 'layers' and 'tensors' (InfiniteVLCache.state_dict()).")
        tensors = state["tensors"]
        seen = check_count(state.get("seen_tokens"), "seen_tokens")
        check_count(state.get("padded_through", seen), "padded_through", high=seen)
        text = config.text_config if hasattr(config, "text_config") else config
        layers = state.get("layers")
        if not isinstance(layers, list) or len(layers) != len(text.layer_types):
            count = len(layers) if isinstance(layers, list) else layers
            raise ValueError(f"The saved state has {count} layers, the model {len(text.layer_types)}.")
        positions = tensors.get("next_positions")
        batch = positions.shape[0] if isinstance(positions, torch.Tensor) and positions.dim() == 1 else None
        expected = set()
        if seen:
            positions = check_tensor(tensors, "next_positions", (batch,), (torch.int64,))
            if (positions < 0).any() or (positions > MAX_COUNT).any():
                raise ValueError("The saved state's tensor 'next_positions' holds negative or absurd positions.")
            expected.add("next_positions")
        for i, (kind, record) in enumerate(zip(text.layer_types, layers)):
            if not isinstance(record, dict):
                raise ValueError(f"The saved state's layers[{i}] is not a layer record.")
            layer_class = InfiniteVLLinearAttentionLayer if kind == "linear_attention" else InfiniteVLAttentionLayer
            expected |= layer_class.check_state_dict(text, i, record, tensors, batch, seen)
        refuse_extra(tensors, expected)

    @classmethod
    def from_state_dict(cls, config: InfiniteVLConfig | InfiniteVLTextConfig, state: dict,
                        device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> InfiniteVLCache:
        """A dynamic cache holding `state` (`state_dict()`'s form), checked whole first (`check_state_dict`: a
        ValueError names the bad field). Tensors are copied to `device`; keys, values and conv states take `dtype`
        when given (a state saved from a bf16 model resumes in an fp32 one without mixing precisions); recurrent
        states stay float32. Each kept as saved when None.

        ```python
        >>> state = cache.state_dict()
        >>> same = InfiniteVLCache.from_state_dict(model.config, state, device=model.device, dtype=model.dtype)
        ```
        """
        cls.check_state_dict(config, state)
        cache = cls(config)
        for i, (layer, record) in enumerate(zip(cache.layers, state["layers"])):
            layer.load_state_dict(record, state["tensors"], _prefix(i), device, dtype)
        cache.seen_tokens = state["seen_tokens"]
        cache.padded_through = state.get("padded_through", cache.seen_tokens)
        positions = state["tensors"].get("next_positions")
        cache.next_positions = None if positions is None else _loaded(positions, device)
        return cache

    def start_fresh_(self, start: torch.Tensor) -> None:
        """Empty a static cache in place on the device (no host work, so a captured graph can do it): rings
        flagged empty, states zeroed, positions at 0, and the ring step at `start` ([1], may be negative: tokens
        fed before step 0 are the left padding of a prompt laid into a longer captured shape)."""
        for layer in self.layers:
            for tensor in _layer_tensors(layer):
                tensor.zero_()
            if isinstance(layer, InfiniteVLRingAttentionLayer):
                layer.empty = True
        self.next_positions.zero_()
        self.device_step.copy_(start)

    def adopt_buffers_of(self, other: InfiniteVLCache, seen_tokens: int) -> None:
        """Hold `other`'s tensors as they are (a prompt was just fed through them), `seen_tokens` fed so far."""
        self.layers, self.device_step, self.next_positions = list(other.layers), other.device_step, other.next_positions
        self.chunk_masks = other.chunk_masks
        self.seen_tokens = self.padded_through = seen_tokens

    def fork(self) -> InfiniteVLCache:
        """An independent copy: feeding the fork leaves this cache untouched."""
        return _deepcopy_state(self, self._state_tensors())

    def own_buffers(self) -> None:
        """Give this cache its own copy of every tensor it holds, in place (its layers may share tensors with
        another cache, e.g. the buffers a captured decode graph reads; after this, feeding either leaves the
        other untouched)."""
        self.layers, self.device_step, self.next_positions, self.chunk_masks = _deepcopy_state(
            (self.layers, self.device_step, self.next_positions, self.chunk_masks), self._state_tensors()
        )

    def _state_tensors(self) -> list[torch.Tensor]:
        tensors = [t for layer in self.layers for t in _layer_tensors(layer)]
        return tensors + [t for t in (self.next_positions, self.device_step) if t is not None]

    def share_buffers_of(self, other: InfiniteVLCache) -> None:
        """Hold `other`'s tensors (the same layer objects), after copying this cache's state into them.

        Both caches must be static and of one shape (batch, dtype, device, config). Afterwards the two are one
        memory until `own_buffers()` is called on either; the token counters stay each cache's own."""
        if not (self.is_static and other.is_static):
            raise ValueError("share_buffers_of() needs two static caches (InfiniteVLCache.to_static()).")
        if self.layer_types != other.layer_types or self.batch_rows != other.batch_rows:
            raise ValueError(
                f"Cannot share the buffers of a cache of another shape: {other.batch_rows} rows of {other.layer_types} "
                f"vs {self.batch_rows} rows of {self.layer_types}."
            )
        for mine, theirs in zip(self.layers, other.layers):
            for a, b in zip(_layer_tensors(mine), _layer_tensors(theirs)):
                if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
                    raise ValueError(f"Cannot share buffers: a cache tensor is {tuple(b.shape)} {b.dtype} on {b.device}, "
                                     f"this cache's is {tuple(a.shape)} {a.dtype} on {a.device}.")
                b.copy_(a)
            if isinstance(theirs, InfiniteVLRingAttentionLayer):  # (they now hold this cache's state)
                theirs.empty = mine.empty
        other.next_positions.copy_(self.next_positions)
        other.device_step.copy_(self.device_step)
        other.seen_tokens, other.padded_through = self.seen_tokens, self.padded_through
        self.layers, self.device_step, self.next_positions = list(other.layers), other.device_step, other.next_positions
        self.chunk_masks = other.chunk_masks

    def buffer_addresses(self) -> tuple[int, ...]:
        """Device addresses of every state tensor: what a captured graph over this cache depends on."""
        tensors = [t for layer in self.layers for t in _layer_tensors(layer)]
        tensors += [t for t in (self.next_positions, self.device_step) if t is not None]
        return tuple(t.data_ptr() for t in tensors)

    def reset(self) -> None:
        """Forget everything; a static cache becomes dynamic again (its next input is a prompt)."""
        self.layers = self._fresh_layers()
        self.seen_tokens = 0
        self.padded_through = 0
        self.next_positions = None
        self.device_step = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers:
            layer.reorder_cache(beam_idx)
        if self.next_positions is not None:
            self.next_positions = _store(self.next_positions, self.next_positions.index_select(0, beam_idx.to(self.next_positions.device)))

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

    @property
    def is_static(self) -> bool:
        return self.device_step is not None

    def to_static(self) -> InfiniteVLCache:
        """Switch, in place, to preallocated buffers that decode keeps in place (for CUDA graphs).

        Sliding-window layers become rings of `window` slots; Gated DeltaNet states are already fixed-size.
        Call after the prompt went through. Full-attention layers grow without bound and cannot be static.
        """
        if self.is_static:
            return self
        if self.seen_tokens == 0 or self.next_positions is None:
            raise ValueError("to_static() needs a cache that a prompt already went through.")
        like = next((layer.keys for layer in self.layers if isinstance(layer, InfiniteVLAttentionLayer)), None)
        device = self.next_positions.device
        # The ring step counts the tokens the windows hold, which `seen_tokens` may not (StreamingSession.ask restarts
        # a fork's counter so that generate() sees the question as the prompt): rings continue from the windows.
        fed = {layer.cumulative_length for layer in self.layers if isinstance(layer, InfiniteVLAttentionLayer)}
        if len(fed) > 1:
            raise ValueError(f"The attention layers of this cache were fed different numbers of tokens {sorted(fed)}.")
        step = fed.pop() if fed else self.seen_tokens
        self.device_step = torch.full((1,), step, dtype=torch.long, device=device)
        for i, layer in enumerate(self.layers):
            if isinstance(layer, InfiniteVLAttentionLayer):
                if layer.window is None:
                    raise ValueError(f"Layer {i} is full attention: its cache grows with the input and cannot be static.")
                self.layers[i] = InfiniteVLRingAttentionLayer.from_window(layer, self.batch_rows, self.device_step, like,
                                                                          self.chunk_masks)
        return self

    def to_dynamic(self) -> InfiniteVLCache:
        """Switch, in place, from rings back to growing window layers (e.g. to save the memory to disk)."""
        if not self.is_static:
            return self
        fed = int(self.device_step)  # tokens the rings hold, whatever `seen_tokens` counts
        for i, layer in enumerate(self.layers):
            if isinstance(layer, InfiniteVLRingAttentionLayer):
                self.layers[i] = layer.to_window_layer(fed)
        self.device_step = None
        return self

    def attention_keys(self, layer_idx: int, key_states, value_states, valid=None, token_order=False) -> AttentionKeys:
        """Layer `layer_idx`'s update for its attention call: its keys/values, flags and their order (see
        `AttentionKeys`); token_order asks a ring for its keys oldest first (a long chunk's kernels)."""
        layer = self.layers[layer_idx]
        full = token_order and self.window_is_full(layer.window)
        return layer.attention_keys(key_states, value_states, valid=valid, token_order=token_order, window_full=full)

    def window_is_full(self, window: int) -> bool:
        """Whether the `window - 1` tokens before the next one are all real: that many were fed since the last
        call with padding. Then every slot of a ring of that window holds a token, and a long chunk's attention
        needs no mask for them. Host-side counts: no sync."""
        return self.seen_tokens - self.padded_through >= window - 1

    @property
    def full_windows(self) -> tuple[bool, ...]:
        """`window_is_full` for each distinct window of the attention layers (what a captured call depends on)."""
        return tuple(self.window_is_full(w) for w in sorted({w for w in self._windows if w is not None}))

    @property
    def min_window(self) -> int:
        """The smallest window of the attention layers (what one captured prompt may hold at most)."""
        return min((w for w in self._windows if w is not None), default=1 << 62)

    @property
    def max_tokens_per_call(self) -> int | None:
        """Most tokens one forward may feed a static cache (its smallest ring); None for a dynamic cache."""
        windows = [layer.window for layer in self.layers if isinstance(layer, InfiniteVLRingAttentionLayer)]
        return min(windows) if windows else None

    @property
    def batch_rows(self) -> int:
        return self.next_positions.shape[0]

    def advance(self, position_ids: torch.LongTensor, token_valid: torch.Tensor | None, length: int) -> None:
        """After a forward: count its tokens and move each row's running position one past its largest
        valid position. Updates happen in place, so a captured CUDA graph advances the same tensors."""
        self.seen_tokens += length
        if token_valid is not None:
            self.padded_through = self.seen_tokens
        if self.device_step is not None:
            self.device_step.add_(length)
        latest = position_ids.amax(dim=0)  # [B, T]
        if token_valid is not None:
            latest = latest.masked_fill(~token_valid, -1)
        latest = latest.amax(dim=-1) + 1
        if self.next_positions is None:
            self.next_positions = latest.clamp(min=0)
        else:
            self.next_positions.copy_(torch.where(latest > 0, latest, self.next_positions))


__all__ = ["InfiniteVLCache", "InfiniteVLAttentionLayer", "InfiniteVLLinearAttentionLayer"]
