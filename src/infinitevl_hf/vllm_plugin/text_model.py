"""InfiniteVL's hybrid decoder for vLLM: per `layer_types`, a sliding-window attention or Gated DeltaNet
mixer, then Qwen2's MLP; pre-norm blocks with vLLM's fused residual RMSNorm."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.qwen2 import Qwen2MLP

from .attention import InfiniteVLAttention
from .gated_deltanet import InfiniteVLGatedDeltaNet, load_tensor

# Checkpoint tensor suffix -> (fused vLLM parameter, shard id) for attention and MLP weights.
STACKED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", "q"),
    "self_attn.k_proj": ("self_attn.qkv_proj", "k"),
    "self_attn.v_proj": ("self_attn.qkv_proj", "v"),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


def _shards_of(target: str) -> set:
    return {shard for suffix, (fused, shard) in STACKED.items() if target.endswith(f"{fused}.weight") or target.endswith(f"{fused}.bias")}


class InfiniteVLDecoderLayer(nn.Module):
    """One pre-norm block; `self_attn` (the checkpoint's name for both mixers) is chosen by `layer_types`."""

    def __init__(self, vllm_config: VllmConfig, layer_idx: int, prefix: str) -> None:
        super().__init__()
        text = vllm_config.model_config.hf_text_config
        self.layer_type = text.layer_types[layer_idx]
        if self.layer_type == "linear_attention":
            self.self_attn = InfiniteVLGatedDeltaNet(text, vllm_config, prefix=f"{prefix}.self_attn")
        else:
            self.self_attn = InfiniteVLAttention(
                text,
                layer_idx,
                cache_config=vllm_config.cache_config,
                quant_config=vllm_config.quant_config,
                prefix=f"{prefix}.self_attn",
            )
        self.mlp = Qwen2MLP(text.hidden_size, text.intermediate_size, text.hidden_act, vllm_config.quant_config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(text.hidden_size, eps=text.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(text.hidden_size, eps=text.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None):
        if residual is None:
            residual, hidden_states = hidden_states, self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        if self.layer_type == "linear_attention":
            hidden_states = self.self_attn(hidden_states)
        else:
            hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": -1, "inputs_embeds": 0})
class InfiniteVLTextModel(nn.Module):
    """Embeddings, decoder layers and final norm; `forward` takes vLLM's flattened tokens and (3, T) mRoPE positions."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        text = vllm_config.model_config.hf_text_config
        self.config = text
        self.embed_tokens = VocabParallelEmbedding(text.vocab_size, text.hidden_size, prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(
            InfiniteVLDecoderLayer(vllm_config, i, prefix=f"{prefix}.layers.{i}") for i in range(text.num_hidden_layers)
        )
        self.norm = RMSNorm(text.hidden_size, eps=text.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load checkpoint tensors named as in `InfiniteVLTextModel` (`layers.3.self_attn.q_proj.weight`, ...)."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        shards: dict[str, set] = {}  # fused parameter -> shards filled so far
        gdn: dict[int, dict[str, torch.Tensor]] = {}
        for name, tensor in weights:
            parts = name.split(".")
            if parts[0] == "layers" and not (parts[1].isdigit() and int(parts[1]) < len(self.layers)):
                raise ValueError(f"Unexpected tensor `{name}`: the model has {len(self.layers)} decoder layers.")
            if parts[0] == "layers" and self.layers[int(parts[1])].layer_type == "linear_attention" and parts[2] == "self_attn":
                gdn.setdefault(int(parts[1]), {})[".".join(parts[3:])] = tensor
                continue
            target, shard = name, None
            for suffix, (fused, shard_id) in STACKED.items():
                if f".{suffix}." in f".{name}":
                    target, shard = name.replace(suffix, fused), shard_id
                    break
            if target not in params:
                raise ValueError(f"Unexpected tensor `{name}` in the checkpoint's text model.")
            load_tensor(params[target], tensor, shard, shards, target, name)
            loaded.add(target)
        # A fused parameter counts as loaded only once all its pieces were (a missing piece is then reported).
        loaded -= {target for target, got in shards.items() if got != _shards_of(target)}
        for idx, tensors in gdn.items():
            layer_loaded = self.layers[idx].self_attn.load_checkpoint_tensors(tensors)
            loaded.update(f"layers.{idx}.self_attn.{n}" for n in layer_loaded)
        return loaded


class InfiniteVLForCausalLM(nn.Module):
    """The text model with its LM head (tied to the embeddings when the config says so)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        text = vllm_config.model_config.hf_text_config
        self.config = text
        self.model = InfiniteVLTextModel(vllm_config=vllm_config, prefix=f"{prefix}.model")
        self.tied = bool(vllm_config.model_config.hf_config.tie_word_embeddings)
        self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size, quant_config=vllm_config.quant_config, prefix=f"{prefix}.lm_head")
        if self.tied:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(text.vocab_size)

    def make_empty_intermediate_tensors(self, *args, **kwargs):
        raise NotImplementedError("InfiniteVL's vLLM plugin does not support pipeline parallelism.")

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Tensors named `model.*` (text model) and `lm_head.weight` (skipped when tied)."""
        text_weights, loaded = [], set()
        for name, tensor in weights:
            if name == "lm_head.weight":
                if not self.tied:
                    param = self.lm_head.weight
                    getattr(param, "weight_loader")(param, tensor)
                    loaded.add(name)
                continue
            if not name.startswith("model."):
                raise ValueError(f"Unexpected tensor `{name}` in the checkpoint's language model.")
            text_weights.append((name[len("model."):], tensor))
        loaded.update(f"model.{n}" for n in self.model.load_weights(text_weights))
        if self.tied:
            loaded.add("lm_head.weight")
        return loaded
