"""One-token decode over a static cache, written as plain tensor functions over the package's kernels.

A decode step of the module path launches thousands of tiny kernels (norm, cast, gate, conv and
recurrence pieces, each its own launch); inside a CUDA graph their launches are cheap, but each still
costs a few microseconds of GPU time, several times the matrix-vector products that should set the
speed. Here a whole decoder layer is one function of tensors (weights, states and activations), with
no Python objects inside, built from ops that pair a torch definition with a Triton kernel: each
matrix-vector product carries the norm, gate, convolution or residual next to it (`ops.matvec`) and
the delta rule is one kernel with its gates (`ops.gated_delta_rule`). At one row every product, norm, gate,
conv, delta rule and attention is such a kernel, and what is left is a few small torch ops (the embedding, the
rotary angles, the ring writes) that a CUDA graph replays cheaply, so the step is not compiled. With more rows the
products are cuBLAS's (the residual added in their epilogue), with the package's norm, convolution and gate
kernels between them. `compile=True` `torch.compile(fullgraph=True)`s each layer function instead (one compiled
function serving every layer of its type), which fuses the torch definitions between the products.

The math is the module path's, op for op (`InfiniteVLGatedDeltaNet` with the torch recurrence,
`InfiniteVLAttention` over a ring, Qwen2's RMSNorm and MLP); tests compare the two. Used by
`CUDAGraphDecoder(..., triton_matvec=True)`, which `generate()` replays on CUDA (`speed.decode_graphs`).
"""

from __future__ import annotations

import copy
import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.ops.elementwise import apply_rotary, torch_apply_rotary
from ..modeling.cache import InfiniteVLCache, InfiniteVLLinearAttentionLayer, InfiniteVLRingAttentionLayer
from ..modeling.gated_deltanet import InfiniteVLGatedDeltaNet
from ..modeling.joined_linear import adjacent_rows, rows_view
from ..modeling.ops.decode_attention import decode_attention
from ..modeling.ops.gated_delta_rule import gated_delta_rule_decode_step
from ..modeling.ops.matvec import ConvUpdate, matvec, matvec_available, rms_norm_matvec
from ..modeling.ops.matvec.reference import Weight
from .shared_storage import save_own_storage


def mlp_block(hidden: torch.Tensor, norm_w: torch.Tensor, gate_up: Weight, down_w: torch.Tensor, eps: float,
              fast: bool = False) -> torch.Tensor:
    """`hidden + MLP(RMSNorm(hidden))`: two products, the norm and the SiLU gate fused into the first."""
    act = rms_norm_matvec(hidden, norm_w, eps, gate_up, glu=True, fast=fast)
    return matvec(act, down_w, residual=hidden, fast=fast, in_place=True)


def gated_deltanet_layer_step(
    hidden: torch.Tensor,
    norm_w: torch.Tensor,
    in_w: Weight,
    conv: ConvUpdate,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    recurrent: torch.Tensor,
    o_norm_w: torch.Tensor,
    o_w: torch.Tensor,
    post_norm_w: torch.Tensor,
    gate_up: Weight,
    down_w: torch.Tensor,
    eps: float,
    o_norm_eps: float,
    fast: bool = False,
) -> torch.Tensor:
    """A whole Gated DeltaNet decoder layer for one token: hidden [B, hidden] -> [B, hidden].

    in_w: the q, k, v, a, b, g projection weights, joined in that order or as a tuple; conv: the q/k/v short
    convolutions and their states [B, D, W-1]; gate_up: the MLP's gate and up weights, joined or a tuple. The
    conv states and the float32 recurrent state [B, H, d_k, d_v] are updated in place. With fast=True one CUDA
    row runs as six kernels: norm + projections + convs, the delta rule with its gates, the gated output norm,
    o_proj + residual, and the MLP's two products."""
    heads, d_k, d_v = recurrent.shape[1:]
    proj = rms_norm_matvec(hidden, norm_w, eps, in_w, conv=conv, fast=fast)  # q, k, v convolved; a, b, g raw
    q, k, v, a, b, gate = proj.split((heads * d_k, heads * d_k, heads * d_v, heads, heads, heads * d_v), dim=-1)
    o = gated_delta_rule_decode_step(q, k, v, a, b, A_log, dt_bias, recurrent, gate=gate, norm_weight=o_norm_w,
                                     norm_eps=o_norm_eps, fast=fast)
    hidden = matvec(o, o_w, residual=hidden, fast=fast, in_place=True)
    return mlp_block(hidden, post_norm_w, gate_up, down_w, eps, fast)


def attention_layer_step(
    hidden: torch.Tensor,
    norm_w: torch.Tensor,
    in_w: Weight,
    in_b: Weight,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_heads: int,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor,
    step: torch.Tensor,
    o_w: torch.Tensor,
    post_norm_w: torch.Tensor,
    gate_up: Weight,
    down_w: torch.Tensor,
    eps: float,
    fast: bool = False,
) -> torch.Tensor:
    """A whole sliding-window attention layer for one token. in_w/in_b: the q, k, v weights and biases, joined
    or as tuples. The token's key/value are written into its ring slot (`step % window`, in place) before the
    query attends over the ring (`ops.decode_attention`)."""
    batch, head_dim = hidden.shape[0], cos.shape[-1]
    kv = kv_heads * head_dim
    qkv = rms_norm_matvec(hidden, norm_w, eps, in_w, in_b, fast=fast)
    q, k, v = (t.reshape(batch, -1, 1, head_dim) for t in qkv.split((qkv.shape[-1] - 2 * kv, kv, kv), dim=-1))
    q, k = (apply_rotary if fast else torch_apply_rotary)(q, k, cos[:, None], sin[:, None])  # cos, sin [B, D] -> [B, 1, D]
    slot = step % keys.shape[2]
    keys.index_copy_(2, slot, k)
    values.index_copy_(2, slot, v)
    valid.index_fill_(1, slot, True)
    out = decode_attention(q, keys, values, valid, head_dim**-0.5, fast=fast).reshape(batch, -1)
    hidden = matvec(out, o_w, residual=hidden, fast=fast, in_place=True)
    return mlp_block(hidden, post_norm_w, gate_up, down_w, eps, fast)


def logits_head(hidden: torch.Tensor, norm_w: torch.Tensor, lm_head_w: torch.Tensor, eps: float, fast: bool = False) -> torch.Tensor:
    return rms_norm_matvec(hidden, norm_w, eps, lm_head_w, fast=fast)


def decoder_problems(model, decoder_modules: list[nn.Module] | None = None) -> tuple[str | None, str | None]:
    """(why no decode graph can serve this model, why the compiled step cannot read it beyond that), each None
    when there is none: one pass over the decoder and the head (generate() asks once per call, so the pass is kept
    cheap: a 4B model has about a thousand modules; names are looked up only for a problem found).

    A graph replays fixed kernels on fixed addresses of one device: accelerate's dispatch hooks (device_map,
    offloading), a decoder over several devices and sharded (DTensor) weights are out. Layers other than nn.Linear
    are captured only where their kernels are known to run without host syncs: peft's LoRA layers and torchao's
    quantized weights; others (bitsandbytes' among them) keep the module path. `decoder_modules`: the decoder's
    walk (`preorder_modules(model.model.language_model)`), when the caller has it."""
    if decoder_modules is None:
        decoder_modules = preorder_modules(model.model.language_model)
    modules = [*decoder_modules, model.lm_head]
    if any("_hf_hook" in vars(module) for module in modules):
        return "its modules are dispatched by accelerate hooks (device_map / offloading)", None
    weights = list({id(p): p for module in modules for p in module._parameters.values() if p is not None}.values())
    devices = {p.device for p in weights}
    if len(devices) != 1:
        return f"its decoder spans several devices {sorted(map(str, devices))}", None
    name = functools.partial(_module_name, model)
    compiled = None
    for module in modules:
        kind = type(module)
        if kind is not nn.Linear and isinstance(module, nn.Linear):
            if not _from(module, "peft"):
                return (f"{name(module)} is a {kind.__name__}, not a plain nn.Linear, whose kernels are not known to run "
                        "in a CUDA graph"), None
            compiled = compiled or f"{name(module)} is a {kind.__name__}, not a plain nn.Linear"
        elif compiled is None and any(child.startswith("lora") for child in module._modules):
            compiled = f"{name(module)} carries LoRA adapters"
        elif compiled is None and isinstance(module, InfiniteVLGatedDeltaNet) and not (module.use_short_conv and module.use_gate):
            compiled = (f"{name(module)} is a Gated DeltaNet without short convolutions or output gate "
                        "(use_short_conv/use_gate)")
    for p in weights:
        kind = type(p)
        if kind is nn.Parameter or kind is torch.Tensor:
            if compiled is None and not p.is_floating_point():
                compiled = "some decoder weights are not floating point (quantized)"
            continue
        if type(p.data) is not torch.Tensor and not _from(p.data, "torchao"):  # DTensor shards among them
            return f"{_parameter_name(model, p)} is a {type(p.data).__name__} (sharded or quantized), which is not captured", None
        if compiled is None and type(p.data) is not torch.Tensor:  # torchao: reports a float dtype, holds other data
            compiled = f"{_parameter_name(model, p)} is a {type(p.data).__name__} (quantized), whose data the step cannot read"
    return None, compiled


def preorder_modules(root: nn.Module, walked: dict[int, list[nn.Module]] | None = None) -> list[nn.Module]:
    """`root` and every module below it, in `named_modules()` order, without building names (several times faster
    on a large tree, which `generate()` walks on every call). `walked`: subtrees walked already (id(module) -> that
    module's own walk), spliced in rather than walked again."""
    out, stack, seen = [], [root], set()
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        subtree = walked.get(id(module)) if walked else None
        if subtree is not None:
            fresh = [m for m in subtree if id(m) not in seen]
            seen.update(map(id, fresh))
            out.extend(fresh)
            continue
        seen.add(id(module))
        out.append(module)
        stack.extend(child for child in reversed(module._modules.values()) if child is not None)
    return out


def _module_name(model, module: nn.Module) -> str:
    """`module`'s name in the decoder (as the decoder's own `named_modules` gives it), or "lm_head"."""
    if module is model.lm_head:
        return "lm_head"
    return next(name for name, m in model.model.language_model.named_modules() if m is module)


def _parameter_name(model, parameter: torch.Tensor) -> str:
    if parameter is model.lm_head.weight:
        return "lm_head.weight"
    return next(name for name, p in model.model.language_model.named_parameters() if p is parameter)


def _from(obj, package: str) -> bool:
    """Whether `obj`'s class is defined in `package` (checked by name: the package need not be installed)."""
    return type(obj).__module__.split(".")[0] == package


def _single(tensors: tuple[torch.Tensor, ...] | None) -> Weight | None:
    """A joined group as its one tensor; separate weights stay a tuple (their outputs get concatenated)."""
    return tensors[0] if tensors is not None and len(tensors) == 1 else tensors


def embed_and_rope(input_ids: torch.Tensor, embed_w: torch.Tensor, next_positions: torch.Tensor, rotary) -> tuple:
    """Token embeddings [B, hidden] and the RoPE cos/sin [B, D] of text tokens at `next_positions` (all three
    mRoPE axes advance together for text)."""
    hidden = F.embedding(input_ids[:, 0], embed_w)
    cos, sin = rotary(hidden, next_positions[None, :, None].expand(3, -1, 1))
    return hidden, cos[:, 0], sin[:, 0]


class LayerWeights(NamedTuple):
    """The weights of a decoder layer around its mixer: the two norms and the MLP."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    gate_up: Weight
    down: torch.Tensor


class GatedDeltaNetLayer(NamedTuple):
    """What one Gated DeltaNet layer's step reads: its weights, the module (gates, norm, o_proj) and its cache."""

    weights: LayerWeights
    mixer: InfiniteVLGatedDeltaNet
    in_w: Weight  # q, k, v, a, b, g projections
    conv_w: Weight  # q/k/v short convolutions [D, W]
    conv_b: Weight | None
    cache: InfiniteVLLinearAttentionLayer


class AttentionLayer(NamedTuple):
    """What one sliding-window attention layer's step reads: its weights, the module (o_proj, heads), its ring."""

    weights: LayerWeights
    mixer: nn.Module
    in_w: Weight  # q, k, v projections
    in_b: Weight
    cache: InfiniteVLRingAttentionLayer


_STEP_FUNCTIONS = {
    "embed": embed_and_rope,
    "gdn": gated_deltanet_layer_step,
    "attn": attention_layer_step,
    "head": logits_head,
}
_COMPILED: dict[str, object] = {}


def _step_functions(compile: bool) -> dict:
    if not compile:
        return _STEP_FUNCTIONS
    if not _COMPILED:  # one compiled function per kind, shared by every layer (weights are arguments)
        for name, fn in _STEP_FUNCTIONS.items():
            _COMPILED[name] = torch.compile(fn, fullgraph=True, dynamic=False)
    return _COMPILED


class DecodeStep:
    """`model(input_ids[B, 1], cache)` for a static cache as tensor functions, optionally `torch.compile`d.

    ```python
    >>> step = DecodeStep(model, cache, compile=True)   # cache: static, a prompt went through it
    >>> logits = step(next_token_ids)                         # [B, 1] -> [B, 1, vocab]; the cache advances
    ```
    It never calls Python per-layer cache logic, so a CUDA graph can capture it (`CUDAGraphDecoder`).
    Only text tokens: positions continue on all three mRoPE axes from `cache.next_positions`.

    concat_projections: run the input projections of a layer (q/k/v/a/b/g or q/k/v) and the MLP's gate/up as
    one matrix-vector product each (fewer, larger products: benchmarks/README.md). The weights are
    re-laid, once, as views into one buffer per group, so this costs no memory and the module path keeps
    reading the same numbers; training is unaffected, and a state-dict hook saves each parameter as a tensor
    of its own (safetensors and accelerate's `save_model` refuse or drop parts of a shared buffer).

    triton_matvec: run the package's Triton kernels (CUDA). One row: each product streams its weight once with
    the norm, gate, convolution or residual beside it fused in (`ops.matvec`), and the delta rule with its
    gates is one kernel (`ops.gated_delta_rule`); a Gated DeltaNet layer is then six kernels. More rows: cuBLAS's
    products with the norm, the three convolutions, the gate and the delta rule one kernel each. Needs joined
    projections to use them (separate weights keep the torch path).

    compile: `torch.compile` the layer functions, which fuses the torch ops between the products. With
    triton_matvec and joined projections nothing is left worth it: `generate()` captures the step uncompiled.
    """

    def __init__(self, model, cache: InfiniteVLCache, compile: bool = False, concat_projections: bool = False,
                 triton_matvec: bool = False):
        if not cache.is_static:
            raise ValueError("DecodeStep needs a static cache (InfiniteVLCache.to_static()).")
        problem = self.unsupported(model)
        if problem is not None:
            raise ValueError(f"DecodeStep cannot run this model: {problem}.")
        text = model.model.language_model
        self.model, self.text, self.cache = model, text, cache
        if triton_matvec and not matvec_available():
            raise ValueError("triton_matvec=True needs Triton (a CUDA install).")
        self.fast = triton_matvec
        self.compiled = compile
        self.fns = _step_functions(compile)
        self.eps = text.config.rms_norm_eps
        self.layers: list[GatedDeltaNetLayer | AttentionLayer] = []
        for layer, layer_cache in zip(text.layers, cache.layers):
            mixer = layer.self_attn
            gate_up = self._joined((layer.mlp.gate_proj, layer.mlp.up_proj), "weight", concat_projections)
            weights = LayerWeights(layer.input_layernorm.weight, layer.post_attention_layernorm.weight, _single(gate_up),
                                   layer.mlp.down_proj.weight)
            if isinstance(layer_cache, InfiniteVLLinearAttentionLayer):
                projections = (mixer.q_proj, mixer.k_proj, mixer.v_proj, mixer.a_proj, mixer.b_proj, mixer.g_proj)
                convs = (mixer.q_conv1d, mixer.k_conv1d, mixer.v_conv1d)
                conv_ws = tuple(w[:, 0] for w in self._joined(convs, "weight", concat_projections))  # [D, 1, W] -> [D, W]
                self.layers.append(GatedDeltaNetLayer(
                    weights, mixer, _single(self._joined(projections, "weight", concat_projections)), _single(conv_ws),
                    _single(self._joined(convs, "bias", concat_projections)), layer_cache))
            elif isinstance(layer_cache, InfiniteVLRingAttentionLayer):
                projections = (mixer.q_proj, mixer.k_proj, mixer.v_proj)
                self.layers.append(AttentionLayer(
                    weights, mixer, _single(self._joined(projections, "weight", concat_projections)),
                    _single(self._joined(projections, "bias", concat_projections)), layer_cache))
            else:
                raise ValueError(f"DecodeStep cannot decode a {type(layer_cache).__name__} layer.")

    @classmethod
    def join_weights(cls, model) -> None:
        """Lay out, once, each group of weights the joined step reads (a layer's input projections and convolutions,
        the MLP's gate and up) as views of one buffer; later calls find them laid out and copy nothing. Every CUDA
        graph builder calls this (through `speed.weight_layout.lay_out_weights`) before it captures: laying the
        weights out later would move them from under the graphs captured before (their old storage is freed)."""
        if cls.unsupported(model) is not None:
            return
        for layer in model.model.language_model.layers:
            mixer = layer.self_attn
            cls._joined((layer.mlp.gate_proj, layer.mlp.up_proj), "weight", True)
            if isinstance(mixer, InfiniteVLGatedDeltaNet):
                cls._joined((mixer.q_proj, mixer.k_proj, mixer.v_proj, mixer.a_proj, mixer.b_proj, mixer.g_proj),
                            "weight", True)
                convs = (mixer.q_conv1d, mixer.k_conv1d, mixer.v_conv1d)
                cls._joined(convs, "weight", True)
                cls._joined(convs, "bias", True)
            else:
                cls._joined((mixer.q_proj, mixer.k_proj, mixer.v_proj), "weight", True)
                cls._joined((mixer.q_proj, mixer.k_proj, mixer.v_proj), "bias", True)

    @staticmethod
    def unsupported(model) -> str | None:
        """Why this step cannot stand in for this model's decoder, or None. Besides why no graph can serve it
        (`decoder_problems`): it
        reads the weights directly, so every module must be the plain one (no LoRA or quantized layers, whose
        forward it would skip), and it covers Gated DeltaNet layers with short convolutions and the output gate."""
        capture, compiled = decoder_problems(model)
        return capture or compiled

    def with_cache(self, cache: InfiniteVLCache) -> DecodeStep:
        """The same step (same weights, concatenated ones included) over another static cache of the same shape."""
        if not cache.is_static:
            raise ValueError("DecodeStep needs a static cache (InfiniteVLCache.to_static()).")
        other = copy.copy(self)
        other.cache = cache
        other.layers = [entry._replace(cache=layer_cache) for entry, layer_cache in zip(self.layers, cache.layers)]
        return other

    @staticmethod
    def _joined(modules: tuple[nn.Module, ...], name: str, join: bool) -> tuple[torch.Tensor, ...] | None:
        """The `name` parameters of `modules`, or (join=True) one tensor of all of them stacked by rows, of which
        the parameters become views; None when the modules have no such parameter."""
        params = tuple(getattr(m, name) for m in modules)
        if any(p is None for p in params):
            return None
        if not join:
            return params
        if adjacent_rows(params):  # laid out by an earlier step: a view over all of them, no copy
            return (rows_view(params),)
        joined = torch.cat([p.detach() for p in params])
        offset = 0
        for module, p in zip(modules, params):  # the parameters become views of the joined buffer; old storage is freed
            p.data = joined[offset : offset + p.shape[0]]
            offset += p.shape[0]
            if not getattr(module, "_saves_own_storage", False):
                module.register_state_dict_post_hook(save_own_storage)
                module._saves_own_storage = True
        return (joined,)

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor) -> torch.Tensor:
        cache, fns, eps, fast = self.cache, self.fns, self.eps, self.fast
        hidden, cos, sin = fns["embed"](input_ids, self.text.embed_tokens.weight, cache.next_positions, self.text.rotary_emb)
        for entry in self.layers:
            w, mixer, states = entry.weights, entry.mixer, entry.cache
            if isinstance(entry, GatedDeltaNetLayer):
                conv = ConvUpdate(entry.conv_w, entry.conv_b, tuple(states.conv_states[j] for j in range(3)))
                hidden = fns["gdn"](
                    hidden, w.input_norm, entry.in_w, conv, mixer.A_log, mixer.dt_bias, states.recurrent_states[0],
                    mixer.o_norm.weight, mixer.o_proj.weight, w.post_norm, w.gate_up, w.down, eps, mixer.o_norm.eps, fast,
                )
            else:
                hidden = fns["attn"](
                    hidden, w.input_norm, entry.in_w, entry.in_b, cos, sin, mixer.num_key_value_heads,
                    states.keys, states.values, states.valid, states.step,
                    mixer.o_proj.weight, w.post_norm, w.gate_up, w.down, eps, fast,
                )
        logits = fns["head"](hidden, self.text.norm.weight, self.model.lm_head.weight, eps, fast)
        cache.next_positions.add_(1)
        cache.device_step.add_(1)
        cache.seen_tokens += 1
        return logits[:, None]
