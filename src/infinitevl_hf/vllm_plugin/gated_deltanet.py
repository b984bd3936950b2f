"""InfiniteVL's Gated DeltaNet layer on vLLM's Qwen3.5 GDN layer (its kernels, state cache and metadata).

vLLM's `QwenGatedDeltaNetAttention` computes the same recurrence as InfiniteVL's `linear_attention` layers
(causal conv + SiLU on q/k/v, L2-normalised q/k, g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b),
output RMSNorm(o) * SiLU(z)). What differs is served by data, not by a new kernel:

- q/k/v/g projections are loaded as the four shards of its fused `in_proj_qkvz`, b/a as `in_proj_ba`, and the
  three separate depthwise convs as slices of its one conv (a depthwise conv is per channel);
- each value head of width d_v = r * d_k is served as r value heads of width d_k sharing q, k, g and beta
  (`checks.gdn_value_split`): a/b/A_log/dt_bias rows are repeated r times; the output norm still runs over the
  whole d_v head, as in the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNormGated
from vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn import QwenGatedDeltaNetAttention
from vllm.platforms import current_platform

from .checks import gdn_value_split


@dataclass
class GatedDeltaNetShape:
    """The fields vLLM's GDN layer reads from a Qwen3.5-style config, worked out from InfiniteVL's text config."""

    hidden_size: int
    rms_norm_eps: float  # the layer's output-norm epsilon (InfiniteVL: `norm_eps`)
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    hidden_act: str = "silu"

    @classmethod
    def from_text_config(cls, text_config) -> "GatedDeltaNetShape":
        split = gdn_value_split(text_config)
        return cls(
            hidden_size=text_config.hidden_size,
            rms_norm_eps=text_config.norm_eps,
            linear_num_key_heads=text_config.num_linear_heads,
            linear_num_value_heads=text_config.num_linear_heads * split,
            linear_key_head_dim=text_config.linear_head_dim,
            linear_value_head_dim=text_config.linear_head_dim,
            linear_conv_kernel_dim=text_config.conv_size,
        )


class InfiniteVLGatedDeltaNet(QwenGatedDeltaNetAttention):
    """A `linear_attention` layer: vLLM's GDN layer with InfiniteVL's head layout and full-head output norm."""

    def __init__(self, text_config, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__(GatedDeltaNetShape.from_text_config(text_config), vllm_config, prefix, gqa_interleaved_layout=False)
        self.value_split = gdn_value_split(text_config)
        self.model_head_v_dim = text_config.linear_value_head_dim
        # RMSNorm over the model's whole value head (d_v), not over the d_k-wide served pieces.
        self.norm = RMSNormGated(
            self.model_head_v_dim,
            eps=text_config.norm_eps,
            group_size=None,
            norm_before_gate=True,
            activation="silu",
            device=current_platform.current_device(),
        )

    def _output_projection(self, core_attn_out: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        tokens = core_attn_out.shape[0]
        out = self.norm(
            core_attn_out.reshape(tokens, -1, self.model_head_v_dim),
            z.reshape(tokens, -1, self.model_head_v_dim),
        )
        output, _ = self.out_proj(out.reshape(tokens, -1))
        return output

    # Checkpoint tensor (suffix after `self_attn.`) -> (parameter, shard id or None).
    CHECKPOINT_TENSORS = {
        "q_proj.weight": ("in_proj_qkvz.weight", 0),
        "k_proj.weight": ("in_proj_qkvz.weight", 1),
        "v_proj.weight": ("in_proj_qkvz.weight", 2),
        "g_proj.weight": ("in_proj_qkvz.weight", 3),
        "b_proj.weight": ("in_proj_ba.weight", 0),
        "a_proj.weight": ("in_proj_ba.weight", 1),
        "A_log": ("A_log", None),
        "dt_bias": ("dt_bias", None),
        "o_norm.weight": ("norm.weight", None),
        "o_proj.weight": ("out_proj.weight", None),
    }
    CONV_TENSORS = ("q_conv1d.weight", "k_conv1d.weight", "v_conv1d.weight")
    PER_HEAD = ("b_proj.weight", "a_proj.weight", "A_log", "dt_bias")

    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor]) -> set[str]:
        """Load one layer's checkpoint tensors (names relative to the layer's `self_attn.`); returns the
        parameter names (relative to this module) that were filled."""
        params = dict(self.named_parameters())
        loaded, shards = set(), {}
        for name, tensor in tensors.items():
            if name in self.CONV_TENSORS:
                continue
            if name not in self.CHECKPOINT_TENSORS:
                raise ValueError(f"Unexpected Gated DeltaNet tensor `{self.prefix}.{name}` in the checkpoint.")
            target, shard = self.CHECKPOINT_TENSORS[name]
            if name in self.PER_HEAD:  # one row per model head -> one per served value head
                tensor = tensor.repeat_interleave(self.value_split, dim=0)
            load_tensor(params[target], tensor, shard, shards, target, f"{self.prefix}.{target}")
            loaded.add(target)
        # A fused projection counts as loaded only once all its pieces were (a missing piece is then reported).
        expected = {t: {s for t2, s in self.CHECKPOINT_TENSORS.values() if t2 == t} for t in shards}
        loaded -= {t for t, got in shards.items() if got != expected[t]}
        convs = [tensors.get(name) for name in self.CONV_TENSORS]
        if any(c is not None for c in convs):
            if any(c is None for c in convs):
                missing = [n for n, c in zip(self.CONV_TENSORS, convs) if c is None]
                raise ValueError(f"The checkpoint lacks `{self.prefix}` conv tensors {missing}.")
            param = params["conv1d.weight"]
            param.weight_loader(param, torch.cat(convs, dim=0))
            loaded.add("conv1d.weight")
        return loaded


def load_tensor(param: torch.Tensor, tensor: torch.Tensor, shard, shards: dict, target: str, name: str) -> None:
    """Load one checkpoint tensor into `param`: as piece `shard` of a fused parameter (recorded in `shards`, so that
    a fused parameter counts as loaded only once all its pieces were), through the parameter's vLLM loader, or by a
    shape-checked copy."""
    loader = getattr(param, "weight_loader", None)
    if shard is not None:
        loader(param, tensor, shard)
        shards.setdefault(target, set()).add(shard)
    elif loader is not None:
        loader(param, tensor)
    else:
        if param.shape != tensor.shape:
            raise ValueError(f"Checkpoint tensor for `{name}` has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}.")
        param.data.copy_(tensor)
