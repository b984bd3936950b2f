r"""Starting weights of the Gated DeltaNet layers that replace teacher attention layers.

Every strategy returns, for one layer, a dict `{parameter name: float32 tensor}` with exactly the
names and shapes of `InfiniteVLGatedDeltaNet` (`q_proj.weight`, `k_proj.weight`, `v_proj.weight`,
`a_proj.weight`, `b_proj.weight`, `A_log`, `dt_bias`, `q_conv1d.weight` [D, 1, W], `k_conv1d.weight`,
`v_conv1d.weight`, `g_proj.weight`, `o_norm.weight`, `o_proj.weight`, and conv biases when
`conv_bias` is set). Notation: H teacher query heads, G key/value heads (r = H / G per group),
d teacher head dim, d_k = `linear_head_dim`, d_v = `expand_v * d_k`.

`random` -- the model's own init (`InfiniteVLPreTrainedModel._init_weights`: linear weights
    N(0, initializer_range), convs likewise, norms 1, A ~ U(0, 16), dt ~ logU(1e-3, 1e-1)). Each layer
    is built alone in a one-layer `InfiniteVLTextModel`, so memory stays one layer; the numbers come from
    `torch.manual_seed(seed + layer_idx)`, not from the random stream of a whole-model build.

`mimic` -- the official release's starting point: identity convs, A = 1 (`A_log = 0`), zero `a_proj`
    and `b_proj` (so beta = sigmoid(0) = 1/2), a tiny constant step dt = `MIMIC_DT` (`dt_bias` =
    softplus^-1(dt)), and fresh random q/k/v/g/o projections from `random`.

`attention-transfer` (default) -- each GDN head starts from the teacher attention head it replaces.
    With W_q [H*d, hidden], W_k, W_v [G*d, hidden], W_o [hidden, H*d] the teacher's weights:

    - q_proj head h  = W_q head h                              (requires num_linear_heads == H, d_k == d)
    - k_proj head h  = W_k head floor(h / r)                   (GQA: repeated over each group of r heads,
                                                                the head transformers' `repeat_kv` gives h)
    - v_proj head h  = [W_v head floor(h / r) ; 0]             (rows 0..d-1 of the d_v-row head; rest 0)
    - o_proj columns of head h = [W_o columns of head h ; R]   (R: the model's random init; it multiplies
                                                                the zero value rows, so it adds nothing at
                                                                the start, yet lets those rows learn)
    - q/k/v convs = identity: weight 1 at the last tap (the current token), 0 elsewhere, bias 0;
      the SiLU after each conv stays, so q, k, v are silu(W x) rather than W x.
    - A_log = 0, a_proj = 0, dt = `TRANSFER_DT` -> g = -exp(0) * softplus(dt_bias) = -dt for every token:
      the state decays by exp(-1e-3) per token (half-life ~693 tokens), close to un-decayed linear attention,
      while a_proj still gets a gradient of order sigmoid(dt_bias) ~ dt.
    - b_proj = 0 -> beta = 1/2 (the delta rule writes half of the prediction error).
    - o_norm weight = 1; g_proj = the model's random init, so the output gate silu(g_proj x) is input
      dependent and non-zero. An all-zero g_proj would give silu(0) = 0: the layer's output, and the
      gradients of its q/k/v/o projections, would be exactly zero at the start.

    Per head h the layer then keeps a delta-rule linear state over (silu(k_s), silu(v_s)) pairs of the
    teacher's kv group of h, read out by silu(q_t) of teacher head h, in place of
    softmax(q k^T / sqrt(d)) v; the read-out is normalised by o_norm, gated, and mapped to the hidden size
    through the teacher's o_proj columns of head h.

    What cannot be carried over: the teacher's q/k/v biases (GDN projections have no bias; they are
    dropped), the rotary position embedding (GDN has none), the softmax (q and k are L2-normalised and
    the read-out is linear) and the scale of the attention output (o_norm normalises each head).
"""

from __future__ import annotations

import copy
import math

import torch

TRANSFER_DT = 1e-3
MIMIC_DT = 1e-3
INIT_STRATEGIES = ("attention-transfer", "mimic", "random")


def _inverse_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


def gdn_parameter_shapes(text_config, layer_idx: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of one `InfiniteVLGatedDeltaNet`, read off a module built on the meta device."""
    from ..modeling.gated_deltanet import InfiniteVLGatedDeltaNet

    with torch.device("meta"):
        layer = InfiniteVLGatedDeltaNet(text_config, layer_idx)
    return {name: tuple(p.shape) for name, p in layer.named_parameters()}


def random_init(text_config, layer_idx: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The model's own initialisation of Gated DeltaNet layer `layer_idx`, built alone (one layer of memory)."""
    from ..modeling.modeling_infinitevl import InfiniteVLTextModel

    config = copy.deepcopy(text_config)
    config.num_hidden_layers = 1
    config.layer_types = ["linear_attention"]
    config.vocab_size = 1
    config.intermediate_size = 1
    config.pad_token_id = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + layer_idx)
        model = InfiniteVLTextModel(config)
    layer = model.layers[0].self_attn
    return {name: p.detach().float().clone() for name, p in layer.named_parameters()}


def _identity_convs(params: dict[str, torch.Tensor]) -> None:
    for name in ("q_conv1d", "k_conv1d", "v_conv1d"):
        if f"{name}.weight" in params:
            weight = torch.zeros_like(params[f"{name}.weight"])
            weight[..., -1] = 1.0
            params[f"{name}.weight"] = weight
        if f"{name}.bias" in params:
            params[f"{name}.bias"] = torch.zeros_like(params[f"{name}.bias"])


def _slow_decay(params: dict[str, torch.Tensor], dt: float) -> None:
    params["A_log"] = torch.zeros_like(params["A_log"])
    params["dt_bias"] = torch.full_like(params["dt_bias"], _inverse_softplus(dt))
    params["a_proj.weight"] = torch.zeros_like(params["a_proj.weight"])
    params["b_proj.weight"] = torch.zeros_like(params["b_proj.weight"])


def mimic_init(text_config, layer_idx: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The official release's starting point: identity convs, A_log = 0, a/b projections 0, dt = MIMIC_DT,
    random q/k/v/g/o projections, o_norm 1."""
    params = random_init(text_config, layer_idx, seed)
    _identity_convs(params)
    _slow_decay(params, MIMIC_DT)
    params["o_norm.weight"] = torch.ones_like(params["o_norm.weight"])
    return params


def check_attention_transfer(text_config, teacher_head_dim: int | None = None) -> None:
    """Raise a ValueError unless each Gated DeltaNet head can take over one teacher attention head."""
    teacher_heads = text_config.num_attention_heads
    head_dim = teacher_head_dim or text_config.hidden_size // teacher_heads
    heads, d_k, d_v = text_config.num_linear_heads, text_config.linear_head_dim, text_config.linear_value_head_dim
    if heads != teacher_heads:
        raise ValueError(
            f"attention-transfer maps one attention head onto one Gated DeltaNet head, so `num_linear_heads` "
            f"({heads}) must equal the teacher's `num_attention_heads` ({teacher_heads}); use --init mimic or random."
        )
    if d_k != head_dim:
        raise ValueError(
            f"attention-transfer needs `linear_head_dim` ({d_k}) equal to the teacher's head_dim ({head_dim}); "
            "use --init mimic or random."
        )
    if d_v < head_dim:
        raise ValueError(
            f"attention-transfer needs a value head dim `linear_head_dim * expand_v` ({d_v}) of at least the teacher's "
            f"head_dim ({head_dim})."
        )


def attention_transfer_init(
    text_config,
    layer_idx: int,
    teacher: dict[str, torch.Tensor],
    num_key_value_heads: int,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Gated DeltaNet weights of layer `layer_idx` from the teacher attention of that layer (see module docstring).

    teacher: `{"q": W_q [H*d, hidden], "k": W_k [G*d, hidden], "v": W_v [G*d, hidden], "o": W_o [hidden, H*d]}`
    (weights only; biases cannot be represented and are not read).
    """
    q, k, v, o = (teacher[name].float() for name in "qkvo")
    hidden = q.shape[1]
    heads, d_v = text_config.num_linear_heads, text_config.linear_value_head_dim
    teacher_heads = text_config.num_attention_heads
    head_dim = q.shape[0] // teacher_heads
    check_attention_transfer(text_config, head_dim)
    if teacher_heads % num_key_value_heads or k.shape[0] != num_key_value_heads * head_dim:
        raise ValueError(
            f"teacher k_proj of shape {tuple(k.shape)} does not fit {num_key_value_heads} key/value heads of dim {head_dim} "
            f"for {teacher_heads} query heads."
        )
    group = teacher_heads // num_key_value_heads

    params = random_init(text_config, layer_idx, seed)
    params["q_proj.weight"] = q.clone()
    params["k_proj.weight"] = k.view(num_key_value_heads, head_dim, hidden).repeat_interleave(group, dim=0).reshape(-1, hidden)
    value = torch.zeros(heads, d_v, hidden)
    value[:, :head_dim] = v.view(num_key_value_heads, head_dim, hidden).repeat_interleave(group, dim=0)
    params["v_proj.weight"] = value.reshape(heads * d_v, hidden)
    out = params["o_proj.weight"].view(hidden, heads, d_v).clone()
    out[:, :, :head_dim] = o.view(hidden, heads, head_dim)
    params["o_proj.weight"] = out.reshape(hidden, heads * d_v)
    _identity_convs(params)
    _slow_decay(params, TRANSFER_DT)
    params["o_norm.weight"] = torch.ones_like(params["o_norm.weight"])
    return params


__all__ = [
    "INIT_STRATEGIES",
    "MIMIC_DT",
    "TRANSFER_DT",
    "attention_transfer_init",
    "check_attention_transfer",
    "gdn_parameter_shapes",
    "mimic_init",
    "random_init",
]
