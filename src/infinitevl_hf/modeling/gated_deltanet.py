"""The Gated DeltaNet token mixer (Yang et al., ICLR 2025) of InfiniteVL's `linear_attention` layers.

Per head, with the state S (d_k x d_v, float32):

    S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T,    o_t = S_t^T q_t / sqrt(d_k)

where q, k and v come from separate projections, each followed by a depthwise causal convolution
of width `conv_size` and SiLU; q and k are L2-normalised; beta = sigmoid(b_proj x);
g = -exp(A_log) * softplus(a_proj x + dt_bias). The output is o_proj(RMSNorm(o) * SiLU(g_proj x)).

Parameter count for InfiniteVL-4B (hidden 2048, 16 heads, d_k 128, d_v 256): q/k 2 x 2048^2,
v and g 2 x 2048 x 4096, o 4096 x 2048, a/b 2 x 16 x 2048, convs (2048 + 2048 + 4096) x 4,
o_norm 256, A_log and dt_bias 16 each: about 37.8M per layer.

Padding (0 in the attention mask) never reaches the state: padded inputs are zeroed before the
convolutions and get beta = 0 and g = 0, which leaves S unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_infinitevl import InfiniteVLTextConfig
from .as_defined import runs_as_defined
from .joined_linear import apply_gated_norm_linear, apply_linear, project, project_convolved
from .ops import causal_conv1d, chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
from .ops.causal_conv1d import causal_conv1d_group
from .ops.gated_delta_rule import gated_delta_rule_decode_step, gdn_gates
from .ops.norms import gated_rms_norm

# Prompts up to this many tokens use the recurrent kernel, as the official release does.
RECURRENT_MAX_TOKENS = 64


def initial_decay_parameters(num_heads: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The official initialisation of the decay: `A ~ U(0, 16)` and `dt ~ logU(1e-3, 1e-1)` stored through
    softplus^-1 in `dt_bias`. Returns (A_log, dt_bias), float32 [num_heads]."""
    A = torch.empty(num_heads, dtype=torch.float32, device=device).uniform_(0, 16)
    log_dt = torch.rand(num_heads, device=device) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)
    dt = log_dt.exp().clamp(min=1e-4)
    return A.log(), dt + torch.log(-torch.expm1(-dt))


class InfiniteVLShortConvolution(nn.Conv1d):
    """Depthwise causal convolution + SiLU over [B, T, D], carrying the last `kernel_size - 1` inputs as state."""

    def __init__(self, hidden_size: int, kernel_size: int, bias: bool = False):
        super().__init__(hidden_size, hidden_size, kernel_size, groups=hidden_size, padding=kernel_size - 1, bias=bias)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None, output_final_state: bool = False, cu_seqlens=None,
                state_in_place: bool = False):
        return causal_conv1d(
            x,
            self.weight.squeeze(1),
            self.bias,
            activation="silu",
            initial_state=state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
            state_in_place=state_in_place,
        )


class InfiniteVLGatedRMSNorm(nn.Module):
    """RMSNorm over the value head dim, then a SiLU gate: `weight * x / rms(x) * silu(gate)` (computed in fp32)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        return gated_rms_norm(x, self.weight, gate, self.eps)


class InfiniteVLGatedDeltaNet(nn.Module):
    """Gated DeltaNet layer with the official parameter names (`q_conv1d`, `a_proj`, `A_log`, `o_norm`, ...)."""

    def __init__(self, config: InfiniteVLTextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.mode = config.mode
        self.num_heads = config.num_linear_heads
        self.head_k_dim = config.linear_head_dim
        self.head_v_dim = config.linear_value_head_dim
        self.key_dim = self.num_heads * self.head_k_dim
        self.value_dim = self.num_heads * self.head_v_dim
        self.use_short_conv = config.use_short_conv
        self.use_gate = config.use_gate
        hidden = config.hidden_size

        self.q_proj = nn.Linear(hidden, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.value_dim, bias=False)
        self.a_proj = nn.Linear(hidden, self.num_heads, bias=False)
        self.b_proj = nn.Linear(hidden, self.num_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(self.num_heads, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        if self.use_short_conv:
            self.q_conv1d = InfiniteVLShortConvolution(self.key_dim, config.conv_size, config.conv_bias)
            self.k_conv1d = InfiniteVLShortConvolution(self.key_dim, config.conv_size, config.conv_bias)
            self.v_conv1d = InfiniteVLShortConvolution(self.value_dim, config.conv_size, config.conv_bias)
        if self.use_gate:
            self.g_proj = nn.Linear(hidden, self.value_dim, bias=False)
        self.o_norm = InfiniteVLGatedRMSNorm(self.head_v_dim, eps=config.norm_eps)
        self.o_proj = nn.Linear(self.value_dim, hidden, bias=False)
        with torch.no_grad():
            A_log, dt_bias = initial_decay_parameters(self.num_heads)
            self.A_log.copy_(A_log)
            self.dt_bias.copy_(dt_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_valid: torch.Tensor | None = None,
        cache=None,
        cu_seqlens: torch.LongTensor | None = None,
        input_norm: nn.Module | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """hidden_states [B, T, hidden]; token_valid [B, T] bool (False on padding) or None.

        cu_seqlens: [N + 1] boundaries of N sequences packed in one row (B = 1, training, no cache): each
        sequence starts from a zero convolution and recurrent state.
        input_norm: the decoder layer's pre-norm, not yet applied to hidden_states: applied here, inside the
        joined input projection at decode where it runs as defined (`joined_linear.project`).
        """
        batch, length, _ = hidden_states.shape
        if cu_seqlens is not None and cache is not None:
            raise ValueError("Packed sequences (cu_seqlens) are for training and cannot use a cache.")
        layer_cache = cache.layers[self.layer_idx] if cache is not None else None
        keep_state = layer_cache is not None

        def masked(x: torch.Tensor) -> torch.Tensor:
            return x if token_valid is None else torch.where(token_valid[..., None], x, torch.zeros_like(x))

        # One product for all six at decode, where the weights are laid out together (`joined_linear.project`),
        # with the norm before it and the convolutions in it, their states shifted where the cache keeps them
        # (`project_convolved`).
        projections = (self.q_proj, self.k_proj, self.v_proj, self.a_proj, self.b_proj)
        projections += (self.g_proj,) if self.use_gate else ()
        convolved = None
        if self.use_short_conv and keep_state and token_valid is None:
            convolved = project_convolved(hidden_states, projections, (self.q_conv1d, self.k_conv1d, self.v_conv1d),
                                          InfiniteVLShortConvolution, tuple(layer_cache.conv_states[i] for i in range(3)),
                                          input_norm)
        if convolved is not None:
            q, k, v, a, b, *gate = convolved
            for idx in range(3):  # (written in place: this only marks them set)
                layer_cache.update_conv_state(layer_cache.conv_states[idx], state_idx=idx)
        else:
            q, k, v, a, b, *gate = project(hidden_states, projections, input_norm)
            q, k, v = masked(q), masked(k), masked(v)
            if self.use_short_conv:
                q, k, v = self._short_convolutions((q, k, v), layer_cache, cu_seqlens)
            else:
                q, k, v = F.silu(q), F.silu(k), F.silu(v)

        state = layer_cache.recurrent_states[0] if keep_state else None
        if state is not None and length == 1 and token_valid is None and not torch.is_grad_enabled():
            # One decode token: gates, q/k norms and the delta rule as one op (one kernel on CUDA, no backward),
            # the cache's state updated where it stands (so the cache has nothing to store).
            o = gated_delta_rule_decode_step(q.view(batch, -1), k.view(batch, -1), v.view(batch, -1),
                                             a.view(batch, -1), b.view(batch, -1), self.A_log, self.dt_bias, state)
            return self._output(o.view(batch, length, -1, self.head_v_dim), gate, batch, length)

        # Heads are counted off the tensors: under tensor parallelism a rank holds only its share of them.
        q = q.view(batch, length, -1, self.head_k_dim)
        k = k.view(batch, length, -1, self.head_k_dim)
        v = v.view(batch, length, -1, self.head_v_dim)
        g, beta = gdn_gates(a, b, self.A_log, self.dt_bias)
        if token_valid is not None:
            beta = torch.where(token_valid[..., None], beta, torch.zeros_like(beta))
            g = torch.where(token_valid[..., None], g, torch.zeros_like(g))

        recurrent = length <= RECURRENT_MAX_TOKENS or self.mode == "fused_recurrent"
        rule = fused_recurrent_gated_delta_rule if recurrent and not self.training else chunk_gated_delta_rule
        o, final_state = rule(
            q,
            k,
            v,
            g=g,
            beta=beta,
            initial_state=state,
            output_final_state=keep_state,
            cu_seqlens=cu_seqlens,
            use_qk_l2norm_in_kernel=True,
            state_in_place=state is not None and not torch.is_grad_enabled(),  # autograd keeps the old state
        )
        if keep_state:
            layer_cache.update_recurrent_state(final_state, state_idx=0)
        return self._output(o, gate, batch, length)

    def _output(self, o: torch.Tensor, gate: list, batch: int, length: int) -> torch.Tensor:
        """o_proj(o_norm(o, SiLU gate)) of the rule's output o [B, T, H, V]: at decode one op where both run as
        defined (`joined_linear.apply_gated_norm_linear`: for one row the norm in the product's prologue)."""
        gate = gate[0].view(batch, length, -1, self.head_v_dim) if self.use_gate else None
        if gate is not None:
            joined = apply_gated_norm_linear(o, gate, self.o_norm, InfiniteVLGatedRMSNorm, self.o_proj)
            if joined is not None:
                return joined
        return apply_linear(self.o_norm(o, gate).reshape(batch, length, -1), self.o_proj)

    def _short_convolutions(self, qkv: tuple, layer_cache, cu_seqlens) -> tuple[torch.Tensor, ...]:
        """q, k and v through their convolutions (+ SiLU), each cache state overwritten where it stands outside
        autograd (`_store` then has nothing to copy). Convolutions that run as defined go through one op (one
        launch at decode)."""
        convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
        keep_state = layer_cache is not None
        states = tuple(layer_cache.conv_states[i] for i in range(3)) if keep_state else None
        in_place = keep_state and not torch.is_grad_enabled()  # under autograd the old states stay as they were
        if all(runs_as_defined(conv, InfiniteVLShortConvolution) for conv in convs):
            outputs, finals = causal_conv1d_group(
                qkv, tuple(conv.weight.squeeze(1) for conv in convs), tuple(conv.bias for conv in convs), "silu",
                states, keep_state, cu_seqlens, state_in_place=in_place,
            )
        else:
            pairs = [conv(x, state=states[i] if keep_state else None, output_final_state=keep_state,
                          cu_seqlens=cu_seqlens, state_in_place=in_place) for i, (conv, x) in enumerate(zip(convs, qkv))]
            outputs, finals = tuple(y for y, _ in pairs), tuple(final for _, final in pairs)
        if keep_state:
            for idx, final in enumerate(finals):
                layer_cache.update_conv_state(final, state_idx=idx)
        return outputs
