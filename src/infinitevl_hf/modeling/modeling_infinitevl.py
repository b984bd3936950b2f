"""InfiniteVL: the Qwen2.5-VL vision tower feeding a decoder of sliding-window attention and Gated DeltaNet.

Data flow: embed tokens -> vision tower (transformers' Qwen2.5-VL classes; its attention batches the windows,
see `speed.vision`) -> image/video features scattered into their placeholder tokens -> 3-D mRoPE
positions (continuing from the cache) -> decoder layers by `config.layer_types` -> norm -> lm_head.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.utils.generic import can_return_tuple
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
)

from .as_defined import calls_as_defined
from .attention import InfiniteVLAttention, InfiniteVLRotaryEmbedding
from .cache import InfiniteVLCache
from .compat import CACHE_KWARG, pop_cache_kwarg
from ..speed.generation import fast_forward, generate_call, plan_generation, samples_ahead, warmup
from ..speed.sampling_loop import sample_ahead
from .configuration_infinitevl import InfiniteVLConfig, InfiniteVLTextConfig
from .gated_deltanet import InfiniteVLGatedDeltaNet, initial_decay_parameters
from .input_checks import check_vision_inputs
from .mlp import InfiniteVLMLP
from .outputs import InfiniteVLCausalLMOutputWithPast, InfiniteVLModelOutputWithPast, hidden_state_selection
from .loading import LEGACY_KEY_MAPPING, check_loading_info
from .positions import mrope_position_ids, num_vision_tokens, packed_mrope_position_ids
from .remote_code import set_auto_map, write_model_card, write_remote_code
from .rms_norm import InfiniteVLRMSNorm, add_then_norm
from ..speed.vision import speed_up_vision_tower


class InfiniteVLPreTrainedModel(PreTrainedModel):
    config_class = InfiniteVLConfig
    config: InfiniteVLConfig
    base_model_prefix = "model"
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["InfiniteVLDecoderLayer", "Qwen2_5_VLVisionBlock"]
    _supports_sdpa = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False
    # The decay parameters stay float32 when the model is loaded in float16, and quantizers leave them alone (they
    # are read as float32 anyway). The convolutions and norms are not linear layers, so no quantizer converts them.
    _keep_in_fp32_modules = ["A_log", "dt_bias"]
    # The Gated DeltaNet state cannot be rolled back to fewer tokens: generate() refuses assisted decoding and
    # prompt lookup up front instead of failing in the cache's crop().
    _is_stateful = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, InfiniteVLGatedDeltaNet):
            A_log, dt_bias = initial_decay_parameters(module.num_heads, device=module.A_log.device)
            init.copy_(module.A_log, A_log)
            init.copy_(module.dt_bias, dt_bias.to(module.dt_bias.dtype))
        elif isinstance(module, InfiniteVLRotaryEmbedding):
            fresh = InfiniteVLRotaryEmbedding(self.config.get_text_config())
            init.copy_(module.inv_freq, fresh.inv_freq.to(module.inv_freq.device))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, reading both key namings of the official checkpoint and refusing
        checkpoints with missing, unexpected or mis-shaped tensors (nothing is silently random-initialised).

        `from_pretrained(None, config=config, state_dict=tensors)` loads the given tensors and, as transformers
        documents, initialises the ones it lacks with `_init_weights` (transformers' load report lists them);
        unexpected or mis-shaped tensors are refused there too."""
        kwargs.setdefault("key_mapping", LEGACY_KEY_MAPPING)
        wants_info = kwargs.pop("output_loading_info", False)
        given_weights = pretrained_model_name_or_path is None and kwargs.get("state_dict") is not None
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        check_loading_info(model, info, pretrained_model_name_or_path, allow_missing=given_weights)
        generation_uses_cache(model)
        return (model, info) if wants_info else model

    def save_pretrained(self, save_directory, *args, remote_code_files: bool = True, **kwargs):
        """`PreTrainedModel.save_pretrained`, and by default also the model code as flat trust_remote_code files
        plus `config.auto_map`, so the folder loads with `trust_remote_code=True` where this package is not
        installed. A README.md model card is written when absent and a card writer is installed."""
        if remote_code_files and kwargs.get("is_main_process", True):
            set_auto_map(self.config)
            write_remote_code(save_directory)
            write_model_card(save_directory, self.config)
        return super().save_pretrained(save_directory, *args, **kwargs)


def check_cache_type(cache) -> None:
    """Refuse a cache that is not an `InfiniteVLCache` (None is fine: one is built)."""
    if cache is not None and not isinstance(cache, InfiniteVLCache):
        raise TypeError(
            f"InfiniteVL needs an `InfiniteVLCache` (it keeps Gated DeltaNet states), got {type(cache).__name__}."
        )


def generation_uses_cache(model) -> None:
    """Make `generate()` decode with the cache unless a call asks otherwise.

    The released config says `use_cache: false` (a training setting), which transformers copies into the
    generation defaults; without a cache every new token re-runs the whole prompt. `generate(use_cache=False)`
    still does that when asked."""
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.use_cache is False:
        generation_config.use_cache = True


class InfiniteVLDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: `self_attn` is sliding-window attention or Gated DeltaNet per `layer_types`, then the MLP."""

    def __init__(self, config: InfiniteVLTextConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        if self.layer_type == "linear_attention":
            self.self_attn = InfiniteVLGatedDeltaNet(config, layer_idx)
        else:
            self.self_attn = InfiniteVLAttention(config, layer_idx)
        self.mlp = InfiniteVLMLP(config)
        self.input_layernorm = InfiniteVLRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = InfiniteVLRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        token_valid: torch.Tensor | None = None,
        cache: InfiniteVLCache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the layer's output and its attention weights (None for Gated DeltaNet and non-eager attention).

        The norms run inside the products after them where the modules allow (one token per row, outside
        autograd): the input norm in the mixer's input projection (which the mixer is handed the norm for, when
        it is the package's own and called as defined, outside autograd, so that its forward hooks would see
        what they always saw and its backward hooks are never asked), and the post-attention add and norm in
        the MLP's gate/up product (`InfiniteVLMLP.add_normed_to`)."""
        residual = hidden_states
        mixer_input = {}
        # (it applies the norm, inside its projection where it can)
        if not torch.is_grad_enabled() and _calls_as_defined(self.self_attn):
            mixer_input["input_norm"] = self.input_layernorm
        else:
            hidden_states = self.input_layernorm(hidden_states)
        weights = None
        if self.layer_type == "linear_attention":
            hidden_states = self.self_attn(hidden_states, token_valid=token_valid, cache=cache,
                                           cu_seqlens=kwargs.get("cu_seqlens"), **mixer_input)
        else:
            hidden_states, weights = self.self_attn(hidden_states, position_embeddings, token_valid=token_valid,
                                                    cache=cache, **mixer_input, **kwargs)
        if isinstance(self.mlp, InfiniteVLMLP):  # (the sum it makes is this layer's: written over)
            return self.mlp.add_normed_to(residual, hidden_states, self.post_attention_layernorm), weights
        residual, hidden_states = add_then_norm(self.post_attention_layernorm, residual, hidden_states)
        return residual + self.mlp(hidden_states), weights  # an MLP put in its place


def _calls_as_defined(mixer: nn.Module) -> bool:
    """Whether a layer's mixer is the package's attention or Gated DeltaNet, called as defined (`as_defined`)."""
    return calls_as_defined(mixer, InfiniteVLGatedDeltaNet) or calls_as_defined(mixer, InfiniteVLAttention)


class InfiniteVLTextModel(InfiniteVLPreTrainedModel):
    """The hybrid decoder (no vision). Prompts longer than `config.prefill_chunk_tokens` run in chunks through the cache."""

    config_class = InfiniteVLTextConfig
    config: InfiniteVLTextConfig
    input_modalities = ("text",)

    def __init__(self, config: InfiniteVLTextConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(InfiniteVLDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = InfiniteVLRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = InfiniteVLRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: InfiniteVLCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | int | list[int] | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        keep_last: int = 0,
        token_valid: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        r"""
        output_hidden_states (`bool`, `int` or `list[int]`, *optional*): True for the embeddings and every layer's
            output (`num_hidden_layers + 1` tensors), or the indices of those to return (the others are None).
            Defaults to `config.output_hidden_states`.
        output_attentions (`bool`, *optional*): return each layer's attention weights (eager attention; None for
            Gated DeltaNet layers). A prompt then runs in one piece, not in `prefill_chunk_tokens` chunks.
        keep_last (`int`, defaults to 0): return only the last this many positions of `last_hidden_state`
            (0: all). With chunked prefill this keeps memory flat however long the prompt is.
        token_valid (`torch.BoolTensor` [B, T], *optional*): the padding flags (False on padding) instead of
            `attention_mask`, taken as given: no host check of whether anything is padded (captured graphs).
        """
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        wanted_hidden = hidden_state_selection(output_hidden_states, self.config.num_hidden_layers + 1)
        cache = pop_cache_kwarg(kwargs, past_key_values)
        kwargs.pop("cache_position", None)
        batch, length, device = self._check_inputs(input_ids, inputs_embeds, cache)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if token_valid is None:
            token_valid = _token_valid(attention_mask, batch, length, device)
        cu_seqlens = kwargs.get("cu_seqlens")
        if cu_seqlens is not None:
            _check_packed(cu_seqlens, batch, length, cache, token_valid)
            use_cache = False
        if use_cache and cache is None:
            cache = InfiniteVLCache(self.config)
        position_ids = decoder_position_ids(position_ids, cu_seqlens, token_valid, cache, batch, length, device)

        step = self._chunk_length(length, cache, output_attentions, cu_seqlens)
        run_cache = cache
        if step < length and run_cache is None:
            run_cache = InfiniteVLCache(self.config)  # chunks need a cache to pass context along
        pieces, hidden_pieces, attentions = [], [], None
        for start in range(0, length, step):
            stop = min(start + step, length)
            valid = None if token_valid is None else token_valid[:, start:stop]
            embeds = inputs_embeds[:, start:stop] if inputs_embeds is not None else self.embed_tokens(input_ids[:, start:stop])
            hidden, per_layer, attentions = self._run_layers(
                embeds, position_ids[..., start:stop], valid, run_cache, wanted_hidden, output_attentions, **kwargs
            )
            if run_cache is not None:
                run_cache.advance(position_ids[..., start:stop], valid, stop - start)
            # clone: a view of the tail would keep the whole chunk's activations alive
            pieces.append(hidden[:, -keep_last:].clone() if keep_last and step < length else hidden)
            hidden_pieces.append(per_layer)
        hidden_states = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
        if keep_last:
            hidden_states = hidden_states[:, -keep_last:]
        all_hidden = None
        if wanted_hidden is not None:
            all_hidden = tuple(None if parts[0] is None else torch.cat(parts, dim=1) for parts in zip(*hidden_pieces))
        output = BaseModelOutputWithPast(last_hidden_state=hidden_states, hidden_states=all_hidden, attentions=attentions)
        if use_cache and cache is not None:
            output[CACHE_KWARG] = cache
        return output if return_dict else output.to_tuple()

    def _check_inputs(self, input_ids, inputs_embeds, cache) -> tuple[int, int, torch.device]:
        """(batch, length, device) of the call's tokens; refuses what the decoder cannot take."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        # Token ids are embedded chunk by chunk in forward, so a long prompt never holds all its embeddings at once.
        tokens = inputs_embeds if inputs_embeds is not None else input_ids
        batch, length = tokens.shape[:2]
        check_cache_type(cache)
        if length == 0:
            raise ValueError("The input is empty (0 tokens): `input_ids` / `inputs_embeds` need at least one token.")
        if cache is not None:
            cache.check_compatible(self.config)
        return batch, length, tokens.device

    def _chunk_length(self, length: int, cache, output_attentions: bool, cu_seqlens) -> int:
        """How many tokens go through the layers at once: the whole call, or `prefill_chunk_tokens` (at most one
        window over a static cache) for a long prompt at inference."""
        chunk = self.config.prefill_chunk_tokens
        if cache is not None and cache.is_static:  # a ring takes at most one window of tokens per call
            chunk = min(chunk or length, cache.max_tokens_per_call)
        if chunk is None or length <= chunk or self.training or cu_seqlens is not None:
            return length
        # Weights of one chunk cover other keys than the next chunk's, so with output_attentions a prompt runs whole.
        if output_attentions and (cache is None or not cache.is_static):
            return length
        if output_attentions:
            raise ValueError(
                f"output_attentions needs the {length} tokens in one call, but a static cache takes at most "
                f"{chunk} per call; pass fewer tokens per call or use the dynamic cache."
            )
        return chunk

    def _run_layers(self, hidden_states, position_ids, token_valid, cache, wanted_hidden, output_attentions, **kwargs):
        """The layers and the final norm over one chunk. Returns the hidden states, the per-layer hidden states
        (the embeddings, then each layer's output; None where not in `wanted_hidden`) and the attention weights
        (a tuple with one entry per layer when `output_attentions`, else None)."""
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        per_layer, attentions = [], []
        try:
            for i, layer in enumerate(self.layers):
                if wanted_hidden is not None:
                    per_layer.append(hidden_states if i in wanted_hidden else None)
                hidden_states, weights = layer(hidden_states, position_embeddings, token_valid=token_valid, cache=cache, **kwargs)
                attentions.append(weights)
        finally:
            if cache is not None:
                cache.chunk_masks.clear()  # the rings' mask is shared by the layers of this call only
        hidden_states = self.norm(hidden_states)
        if wanted_hidden is not None:
            per_layer.append(hidden_states if len(self.layers) in wanted_hidden else None)
        return hidden_states, per_layer, tuple(attentions) if output_attentions else None


def _token_valid(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor | None:
    """[B, T] bool of the new tokens (False on padding), or None when nothing is padded."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(
            f"InfiniteVL builds its own window masks and takes a 2-D [batch, length] padding mask, got {attention_mask.dim()}-D."
        )
    if attention_mask.shape[0] != batch or attention_mask.shape[1] < length:
        raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} does not cover inputs of shape ({batch}, {length}).")
    valid = attention_mask[:, -length:].to(device=device).bool()
    return None if bool(valid.all()) else valid


def _check_packed(cu_seqlens, batch: int, length: int, cache, token_valid) -> None:
    """Packed sequences: one row, boundaries covering it, no cache and no padding."""
    if cache is not None:
        raise ValueError("Packed sequences (cu_seqlens) are for training and cannot use a cache.")
    if batch != 1 or token_valid is not None:
        raise ValueError(f"Packed sequences (cu_seqlens) need one unpadded row, got batch {batch}"
                         + (" with padding." if token_valid is not None else "."))
    if cu_seqlens.dim() != 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != length or bool((cu_seqlens.diff() <= 0).any()):
        raise ValueError(f"cu_seqlens must rise from 0 to the row length {length}, got {cu_seqlens.tolist()}.")


def decoder_position_ids(position_ids, cu_seqlens, token_valid, cache, batch: int, length: int, device
                         ) -> torch.LongTensor:
    """The call's mRoPE positions [3, B, T]: as given (2-D text positions on all three axes; transformers' 4-row
    layout without its leading text row), restarting per packed sequence, or continuing from the cache."""
    if position_ids is None and cu_seqlens is not None:
        return packed_text_position_ids(cu_seqlens, length)[None].expand(3, -1, -1).to(device)
    if position_ids is None:
        return text_position_ids(token_valid, cache, batch, length, device)
    if position_ids.dim() == 2:
        return position_ids[None].expand(3, -1, -1)
    if position_ids.shape[0] == 4:  # transformers' layout with a leading text-position row
        return position_ids[1:]
    return position_ids


def packed_text_position_ids(cu_seqlens: torch.LongTensor, length: int) -> torch.LongTensor:
    """[1, T] positions of text sequences packed in one row: each restarts at 0 at its boundary."""
    starts = cu_seqlens[:-1].to("cpu")
    lengths = cu_seqlens.diff().to("cpu")
    return (torch.arange(length) - torch.repeat_interleave(starts, lengths))[None]


def text_position_ids(token_valid, cache, batch: int, length: int, device) -> torch.LongTensor:
    """Positions of text-only input continuing from the cache: each valid token advances all three axes by one."""
    start = cache.next_positions if cache is not None and cache.next_positions is not None else None
    start = torch.zeros(batch, dtype=torch.long, device=device) if start is None else start.to(device)
    if token_valid is None:
        positions = start[:, None] + torch.arange(length, device=device)[None]
    else:
        positions = start[:, None] + token_valid.long().cumsum(-1) - 1
        positions = positions.masked_fill(~token_valid, 1)
    return positions[None].expand(3, -1, -1)


class InfiniteVLModel(InfiniteVLPreTrainedModel):
    """Vision tower + hybrid decoder, returning hidden states."""

    def __init__(self, config: InfiniteVLConfig):
        super().__init__(config)
        self.visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(config.vision_config)
        speed_up_vision_tower(self.visual)  # same parameters, faster modules (`speed.vision`)
        self.language_model = InfiniteVLTextModel._from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.language_model.set_input_embeddings(value)

    def vision_features(self, pixel_values: torch.Tensor, grid_thw: torch.LongTensor, **tower_kwargs) -> torch.Tensor:
        """Merged vision features [sum of tokens per image or video, hidden] for flattened patches `pixel_values`.
        tower_kwargs: the tower's grid-dependent inputs when precomputed (`frame_graph.vision_layout`)."""
        return self.visual(pixel_values.to(self.visual.dtype), grid_thw=grid_thw, **tower_kwargs).pooler_output

    def _tower(
        self, pixel_values: torch.Tensor, grid_thw: torch.LongTensor | None, kind: str, **kwargs
    ) -> tuple[BaseModelOutputWithPooling, torch.Tensor]:
        """The tower's output with `pooler_output` split per image/video, and the merged features unsplit."""
        if grid_thw is None:
            raise ValueError(f"{kind} pixel values were given without their grid (`{kind}_grid_thw`).")
        output = self.visual(pixel_values.to(self.visual.dtype), grid_thw=grid_thw, **kwargs)
        merged = output.pooler_output
        sizes = num_vision_tokens(grid_thw, self.config.vision_config.spatial_merge_size).tolist()
        output.pooler_output = torch.split(merged, sizes)
        return output, merged

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor | None = None, **kwargs
    ) -> BaseModelOutputWithPooling | tuple:
        """The vision tower's output for images (flattened patches `pixel_values`, grids `image_grid_thw` [N, 3]):
        `pooler_output` is a tuple of merged features, one [tokens of that image, hidden] tensor per image;
        `last_hidden_state` the tower's last block output; with `output_hidden_states` / `output_attentions`, the
        tower's. `return_dict=False` gives a tuple."""
        return self._tower(pixel_values, image_grid_thw, "image", **kwargs)[0]

    @can_return_tuple
    def get_video_features(
        self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.LongTensor | None = None, **kwargs
    ) -> BaseModelOutputWithPooling | tuple:
        """`get_image_features` for videos: `pixel_values_videos` with grids `video_grid_thw`, one tensor per video."""
        return self._tower(pixel_values_videos, video_grid_thw, "video", **kwargs)[0]

    def placeholder_ids(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        mm_token_type_ids: torch.Tensor | None = None,
    ) -> torch.LongTensor:
        """Token ids [B, T] marking where image and video features go: `input_ids` when given; else, for
        `inputs_embeds` alone, built from `mm_token_type_ids` (1 image, 2 video, as the processor writes them) or
        from the positions whose embedding equals the image/video token's. Other positions get -1 (text)."""
        if input_ids is not None:
            return input_ids
        ids = torch.full(inputs_embeds.shape[:2], -1, dtype=torch.long, device=inputs_embeds.device)
        tokens = ((1, self.config.image_token_id), (2, self.config.video_token_id))
        for type_id, token in tokens:
            if mm_token_type_ids is not None:
                mask = mm_token_type_ids.to(ids.device) == type_id
            else:
                embedding = self.get_input_embeddings()(torch.tensor(token, device=ids.device))
                mask = (inputs_embeds == embedding.to(inputs_embeds.dtype)).all(-1)
            ids = ids.masked_fill(mask, token)
        return ids

    def _scatter(self, placeholder_ids, inputs_embeds, features, grid_thw, token_id: int, kind: str) -> torch.Tensor:
        mask = placeholder_ids == token_id
        expected = int(num_vision_tokens(grid_thw, self.config.vision_config.spatial_merge_size).sum())
        found = int(mask.sum())
        if found != features.shape[0] or found != expected:
            hint = ""
            if found == 0 and bool((placeholder_ids < 0).all()):
                hint = (" With `inputs_embeds` and no `input_ids`, pass `mm_token_type_ids` or embed the placeholders "
                        f"as the {kind} token.")
            raise ValueError(
                f"{kind} features and {kind} tokens do not match: the text has {found} {kind} placeholder tokens, "
                f"but the {kind}s give {features.shape[0]} features (grids {grid_thw.tolist()} expect {expected})."
                + hint
            )
        return inputs_embeds.masked_scatter(mask[..., None].to(inputs_embeds.device), features.to(inputs_embeds))

    def decoder_inputs(
        self,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        cache: InfiniteVLCache | None = None,
        cu_seqlens: torch.LongTensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.LongTensor | None]:
        """What the decoder reads for these inputs: embeddings with the vision features scattered in (None for
        text-only `input_ids`, which the decoder embeds chunk by chunk) and the 3-D mRoPE positions of inputs
        holding images or videos (None for text, whose positions the decoder continues itself)."""
        embeds, positions, _ = self._decoder_inputs(
            input_ids, attention_mask, inputs_embeds, pixel_values, pixel_values_videos, image_grid_thw,
            video_grid_thw, second_per_grid_ts, cache, cu_seqlens, mm_token_type_ids,
        )
        return embeds, positions

    def _decoder_inputs(
        self, input_ids, attention_mask, inputs_embeds, pixel_values, pixel_values_videos, image_grid_thw,
        video_grid_thw, second_per_grid_ts, cache, cu_seqlens, mm_token_type_ids, **tower_kwargs,
    ):
        """`decoder_inputs`, plus the tower outputs {"image": ..., "video": ...} of the vision inputs given."""
        generated = isinstance(cache, InfiniteVLCache) and cache.seen_tokens > 0 and input_ids is not None and input_ids.shape[1] == 1
        check_vision_inputs(self.config, input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                            generated_step=generated)
        tower_outputs = {}
        has_vision = pixel_values is not None or pixel_values_videos is not None
        if inputs_embeds is None and has_vision:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        placeholders = None
        if has_vision or (input_ids is None and mm_token_type_ids is not None):
            placeholders = self.placeholder_ids(input_ids, inputs_embeds, mm_token_type_ids)
        for kind, pixels, grid, token in (
            ("image", pixel_values, image_grid_thw, self.config.image_token_id),
            ("video", pixel_values_videos, video_grid_thw, self.config.video_token_id),
        ):
            if pixels is None:
                continue
            tower_outputs[kind], features = self._tower(pixels, grid, kind, **tower_kwargs)
            inputs_embeds = self._scatter(placeholders, inputs_embeds, features, grid, token, kind)
        if placeholders is None or (image_grid_thw is None and video_grid_thw is None):
            return inputs_embeds, None, tower_outputs
        grids = dict(
            image_token_id=self.config.image_token_id,
            video_token_id=self.config.video_token_id,
            spatial_merge_size=self.config.vision_config.spatial_merge_size,
            tokens_per_second=self.config.vision_config.tokens_per_second,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            second_per_grid_ts=second_per_grid_ts,
        )
        if cu_seqlens is not None:  # packed samples: positions restart per sample
            return inputs_embeds, packed_mrope_position_ids(placeholders, cu_seqlens, **grids), tower_outputs
        positions, _ = mrope_position_ids(  # continue from where the cache left off
            placeholders,
            attention_mask=attention_mask[:, -placeholders.shape[1]:] if attention_mask is not None else None,
            start_positions=cache.next_positions if isinstance(cache, InfiniteVLCache) else None,
            **grids,
        )
        return inputs_embeds, positions, tower_outputs

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: InfiniteVLCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool | int | list[int] | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> InfiniteVLModelOutputWithPast | tuple:
        r"""
        mm_token_type_ids (`torch.Tensor` [B, T], *optional*): 1 at image and 2 at video placeholders (as
            transformers' Qwen2.5-VL processors write it); with `inputs_embeds` and no `input_ids` it tells where
            the vision features go. Without it, the positions whose embedding is the image/video token's are used.
        """
        cache = pop_cache_kwarg(kwargs, past_key_values)
        for unused in ("cache_position", "rope_deltas"):
            kwargs.pop(unused, None)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        # The tower reports its own hidden states / attentions when asked for all of them (indices are the decoder's).
        tower_kwargs = {"output_attentions": bool(output_attentions), "output_hidden_states": output_hidden_states is True}
        inputs_embeds, vision_positions, tower_outputs = self._decoder_inputs(
            input_ids,
            attention_mask,
            inputs_embeds,
            pixel_values,
            pixel_values_videos,
            image_grid_thw,
            video_grid_thw,
            second_per_grid_ts,
            cache,
            kwargs.get("cu_seqlens"),
            mm_token_type_ids,
            **tower_kwargs,
        )
        position_ids = position_ids if position_ids is not None else vision_positions
        kwargs[CACHE_KWARG] = cache
        outputs = self.language_model(
            input_ids=input_ids if inputs_embeds is None else None,  # text only: embedded chunk by chunk
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
            **kwargs,
        )
        output = InfiniteVLModelOutputWithPast(
            **outputs, image_outputs=tower_outputs.get("image"), video_outputs=tower_outputs.get("video")
        )
        return output if return_dict else output.to_tuple()


# Keywords of `loss_function` (transformers' causal-LM loss) that callers such as the Trainer pass to forward.
LOSS_KWARGS = ("shift_labels", "num_items_in_batch", "ignore_index")


class InfiniteVLForConditionalGeneration(InfiniteVLPreTrainedModel, GenerationMixin):
    """InfiniteVL with its language-model head: `forward` (loss with `labels`) and `generate()`.

    Example:

    ```python
    >>> import infinitevl_hf  # registers the Auto classes
    >>> from transformers import AutoModelForImageTextToText, AutoProcessor
    >>> model = AutoModelForImageTextToText.from_pretrained("path/to/InfiniteVL-4B", dtype="bfloat16")
    >>> processor = AutoProcessor.from_pretrained("path/to/InfiniteVL-4B")
    >>> inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
    ...                                        return_dict=True, return_tensors="pt")
    >>> model.generate(**inputs, max_new_tokens=64)
    ```
    """

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # Split over the vocabulary like the tied `embed_tokens` ("embedding_rowwise"), the logits gathered whole.
    _tp_plan = {"lm_head": "colwise_gather_output"}
    accepts_loss_kwargs = False

    def __init__(self, config: InfiniteVLConfig):
        super().__init__(config)
        self.model = InfiniteVLModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        generation_uses_cache(self)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def get_image_features(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor | None = None, **kwargs
    ) -> BaseModelOutputWithPooling | tuple:
        """The vision tower's output for images; see `InfiniteVLModel.get_image_features`."""
        return self.model.get_image_features(pixel_values, image_grid_thw, **kwargs)

    def get_video_features(
        self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.LongTensor | None = None, **kwargs
    ) -> BaseModelOutputWithPooling | tuple:
        """The vision tower's output for videos; see `InfiniteVLModel.get_video_features`."""
        return self.model.get_video_features(pixel_values_videos, video_grid_thw, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: InfiniteVLCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool | int | list[int] | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> InfiniteVLCausalLMOutputWithPast | tuple:
        r"""
        labels (`torch.LongTensor` [B, T], *optional*): targets for the next-token loss; -100 is ignored.
        logits_to_keep (`int`, defaults to 0): compute logits for the last this many positions only (0: all).
        mm_token_type_ids, output_hidden_states, output_attentions: see `InfiniteVLModel.forward` and
            `InfiniteVLTextModel.forward`; unset ones default to the config's.
        Loss keywords (`shift_labels`: targets already shifted, as sequence-parallel training passes them;
        `num_items_in_batch`, `ignore_index`) go to `self.loss_function`.
        """
        cache = kwargs[CACHE_KWARG] = pop_cache_kwarg(kwargs, past_key_values)
        # Inside generate(), a prompt or decode step its planned cache can take replays a captured graph (`speed`).
        logits = fast_forward(
            self, cache, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, labels=labels, pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos, image_grid_thw=image_grid_thw,
            second_per_grid_ts=second_per_grid_ts, logits_to_keep=logits_to_keep,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            cu_seqlens=kwargs.get("cu_seqlens"),
        )
        if logits is not None:
            result = CausalLMOutputWithPast(logits=logits)
            result[CACHE_KWARG] = cache
            return result
        return_dict = self.config.return_dict if return_dict is None else return_dict
        loss_kwargs = {name: kwargs.pop(name) for name in LOSS_KWARGS if name in kwargs}
        wants_loss = labels is not None or loss_kwargs.get("shift_labels") is not None
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            second_per_grid_ts=second_per_grid_ts,
            mm_token_type_ids=mm_token_type_ids,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
            keep_last=logits_to_keep if isinstance(logits_to_keep, int) and not wants_loss else 0,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if wants_loss:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **loss_kwargs
            )
        result = InfiniteVLCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
            video_outputs=outputs.video_outputs,
        )
        if outputs.get(CACHE_KWARG) is not None:
            result[CACHE_KWARG] = outputs[CACHE_KWARG]
        return result if return_dict else result.to_tuple()

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        """transformers' `generate()`. On CUDA each new token replays one captured CUDA graph of the fused decode
        step (`speed.decode_step`), kept on the model and reused by later calls (`warmup()` pays its one-time cost up
        front), and the loop reads the stop one step late (`speed.sampling_loop`).
        `disable_compile=True` decodes through the module path; so do `output_attentions`, `output_hidden_states`,
        training mode and models the compiled step cannot read (quantized, LoRA, several devices), saying why once
        in the log. The cache is of constant size, so on CUDA `cache_implementation="static"` changes nothing (on a
        CPU it decodes over the static window rings instead of the growing window cache)."""
        for name in ("past_key_values", "cache"):  # before transformers reads it as a Cache
            check_cache_type(kwargs.get(name))
        with generate_call(self, custom_generate=kwargs.get("custom_generate") is not None):
            return super().generate(*args, **kwargs)

    def _sample(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                streamer=None, **model_kwargs):
        """transformers' greedy / sampling loop; on CUDA, where the caller does not get the cache back, with the host a
        step ahead of the GPU instead of waiting for it after every token (`speed.sampling_loop`)."""
        if samples_ahead(self, generation_config, synced_gpus, model_kwargs):
            return sample_ahead(self, input_ids, logits_processor, stopping_criteria, generation_config, streamer,
                                **model_kwargs)
        return super()._sample(input_ids, logits_processor, stopping_criteria, generation_config,
                               synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)

    def warmup(self, batch_sizes: tuple[int, ...] = (1,), prompt_tokens: int = 64) -> None:
        """Compile and capture the decode step for these batch sizes now (e.g. at server start-up), so that no
        `generate()` call pays for it later. Does nothing costly where decoding has no graph (CPU)."""
        warmup(self, batch_sizes=batch_sizes, prompt_tokens=prompt_tokens)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """Let generate() set up as usual, with an `InfiniteVLCache` in place of the cache it would make (whatever
        `cache_implementation` says: the cache has a constant size either way), and plan how it decodes."""
        given = model_kwargs.get(CACHE_KWARG)
        implementation = generation_config.cache_implementation
        if implementation == "static":
            generation_config.cache_implementation = None  # transformers would build its own StaticCache
        try:
            super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        finally:
            generation_config.cache_implementation = implementation
        made = model_kwargs.get(CACHE_KWARG)
        if made is not None and made is not given and not isinstance(made, InfiniteVLCache):
            made = model_kwargs[CACHE_KWARG] = InfiniteVLCache(self.config)
        if isinstance(made, InfiniteVLCache):
            plan_generation(self, generation_config, made, self.lm_head.weight.device, cache_given=made is given)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: InfiniteVLCache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        use_cache: bool = True,
        mm_token_type_ids: torch.Tensor | None = None,
        cache: InfiniteVLCache | None = None,
        **kwargs,
    ) -> dict:
        """Feed only the tokens the cache has not seen; vision inputs go in with the prompt, once.

        `mm_token_type_ids` (written by transformers' Qwen2.5-VL processors) goes in with a prompt given as
        `inputs_embeds`, where it marks the image/video placeholders; with `input_ids` the ids mark them."""
        # `cache` is named in the signature so that generate(cache=...) (transformers >= 5.24) passes its kwarg check.
        cache = pop_cache_kwarg(kwargs, cache, past_key_values)
        seen = cache.get_seq_length() if cache is not None else 0
        inputs = {"attention_mask": attention_mask, "use_cache": use_cache, CACHE_KWARG: cache}
        first = kwargs.get("is_first_iteration")
        first = seen == 0 if first is None else first
        if inputs_embeds is not None and first:
            inputs["inputs_embeds"] = inputs_embeds
            inputs["mm_token_type_ids"] = mm_token_type_ids
        elif inputs_embeds is not None:
            # The prompt went in as embeddings, so the cache is not aligned with `input_ids`: feed the new tokens.
            new = kwargs.get("next_sequence_length") or 1
            inputs["input_ids"] = input_ids[:, -new:]
        else:
            inputs["input_ids"] = input_ids[:, seen:]
        if seen == 0:
            inputs.update(
                pixel_values=pixel_values,
                pixel_values_videos=pixel_values_videos,
                image_grid_thw=image_grid_thw,
                video_grid_thw=video_grid_thw,
                second_per_grid_ts=second_per_grid_ts,
            )
        for dropped in ("cache_position", "position_ids", "next_sequence_length", "is_first_iteration", "mm_token_type_ids"):
            kwargs.pop(dropped, None)
        inputs.update(kwargs)
        return inputs


class InfiniteVLQwen2_5_VLForConditionalGeneration(InfiniteVLForConditionalGeneration):
    """The class name in the official release's `architectures` and `auto_map`; the same model."""


__all__ = [
    "InfiniteVLQwen2_5_VLForConditionalGeneration",
    "InfiniteVLPreTrainedModel",
    "InfiniteVLTextModel",
    "InfiniteVLModel",
    "InfiniteVLForConditionalGeneration",
]
