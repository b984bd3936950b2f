"""Vision-tower MLP whose intermediate size is padded with zeros to a multiple of 128 for inference.

Qwen2.5-VL's vision MLP has an intermediate size of 3,420: rows of 6,840 bytes, not a multiple of the 16
bytes that Hopper's tensor-memory loads need, so cuBLAS falls back to its sm80 kernels for all three
products (a large part of a streamed frame's vision time: benchmarks/README.md). Padded to 3,456 with zero rows (gate,
up, their biases) and zero columns (down), the products take the sm90 kernels and compute the same thing:
the extra gate/up outputs are 0, so `act(gate) * up` is 0 there and adds nothing through `down`.

No weight is copied: `lay_out()` (which the graph builders call before they record anything:
`speed.weight_layout`), or else the first CUDA inference call, re-lays the parameters as views into the padded
buffers (gate and up stacked, so they also run as one product), the way `DecodeStep` joins projections. LoRA
layers and quantized weights are not padded: the module's forward serves them.
Names, shapes and values of the parameters are unchanged; a state-dict hook saves each as a tensor of its
own. With gradients enabled (training), or off CUDA, the module runs the parent's forward on its parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLMLP

from ...modeling.ops.elementwise import silu_glu
from ..retype import reads_plain_weights, retype
from ..shared_storage import save_own_storage

PAD_MULTIPLE = 128


class InfiniteVLVisionMLP(Qwen2_5_VLMLP):
    """`Qwen2_5_VLMLP` (with biases) whose inference runs on zero-padded views of its weights."""

    config_act: str | None = None  # the config's hidden_act, set by `use_padded_vision_mlp`

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or not hidden_state.is_cuda:
            return super().forward(hidden_state)  # (on a CPU the padding would only add work)
        if not self.pads():
            self.__dict__.pop("_padded_layout", None)  # padded buffers gone stale (e.g. quantized since)
            return super().forward(hidden_state)
        return self.padded_forward(hidden_state)

    def pads(self) -> bool:
        """Whether CUDA inference runs on padded weights: an intermediate size off the multiple, biases, and three
        plain `nn.Linear` of float weights (LoRA layers and quantized weights keep the parent's forward)."""
        projections = (self.gate_proj, self.up_proj, self.down_proj)
        return (self.gate_proj.out_features % PAD_MULTIPLE != 0 and self.gate_proj.bias is not None
                and all(reads_plain_weights(m, nn.Linear) for m in projections))

    def lay_out(self) -> None:
        """Re-lay the parameters into the padded buffers now, not on the first CUDA call (`speed.weight_layout`);
        where padding no longer applies (e.g. the weights were quantized since), let go of the old padded buffers."""
        if self.pads():
            self._padded()
        else:
            self.__dict__.pop("_padded_layout", None)

    def padded_forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        """The MLP over the zero-padded weights (what `forward` runs for CUDA inference)."""
        gate_up, gate_up_bias, down = self._padded()
        both = F.linear(hidden_state, gate_up, gate_up_bias)
        if self.config_act == "silu":
            return F.linear(silu_glu(both), down, self.down_proj.bias)  # one fused kernel on CUDA
        gate, up = both.chunk(2, dim=-1)
        return F.linear(self.act_fn(gate) * up, down, self.down_proj.bias)

    def _padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The padded [gate; up] weight and bias and the padded down weight, laid out on first use (and again
        if the parameters were replaced since, e.g. by `.to()`)."""
        layout = getattr(self, "_padded_layout", None)
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        if layout is not None and all(
            p.data_ptr() == ptr for p, ptr in zip((gate.weight, up.weight, down.weight), layout[3])
        ):
            return layout[:3]
        size = gate.out_features
        padded = -(-size // PAD_MULTIPLE) * PAD_MULTIPLE
        # parameters must stay ordinary tensors even if the first call runs under inference_mode
        with torch.inference_mode(False), torch.no_grad():
            gate_up = gate.weight.new_zeros(2 * padded, gate.in_features)
            gate_up_bias = gate.bias.new_zeros(2 * padded)
            down_padded = down.weight.new_zeros(down.out_features, padded)
            for rows, module in ((slice(0, size), gate), (slice(padded, padded + size), up)):
                gate_up[rows] = module.weight
                gate_up_bias[rows] = module.bias
                module.weight.data, module.bias.data = gate_up[rows], gate_up_bias[rows]
            down_padded[:, :size] = down.weight
            down.weight.data = down_padded[:, :size]
        for module in (gate, up, down):
            if not getattr(module, "_saves_own_storage", False):
                module.register_state_dict_post_hook(save_own_storage)
                module._saves_own_storage = True
        pointers = tuple(p.data_ptr() for p in (gate.weight, up.weight, down.weight))
        self._padded_layout = (gate_up, gate_up_bias, down_padded, pointers)
        return gate_up, gate_up_bias, down_padded


def use_padded_vision_mlp(visual: nn.Module) -> None:
    """Make every block of a Qwen2.5-VL vision tower use `InfiniteVLVisionMLP` (only the class changes)."""
    act = getattr(getattr(visual, "config", None), "hidden_act", None)
    for block in visual.blocks:
        retype(block.mlp, Qwen2_5_VLMLP, InfiniteVLVisionMLP, "in the vision blocks")
        block.mlp.config_act = act
