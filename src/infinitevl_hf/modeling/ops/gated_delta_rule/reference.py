"""Pure-torch gated delta rule: the CPU path and the ground truth for the CUDA kernels.

Per head, with state ``S`` of shape ``[K, V]`` kept in float32 (float64 if the inputs are float64):

    S_t = exp(g_t) * S_{t-1}
    u_t = beta_t * (v_t - S_t^T k_t)
    S_t = S_t + k_t u_t^T
    o_t = scale * S_t^T q_t

All three functions share fla's ``chunk_gated_delta_rule`` signature (``torch_chunk_*`` adds
``chunk_size``) and the same shapes: q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; g, beta ``[B, T, H]``;
initial_state ``[N, H, K, V]``; they return ``(o [B, T, H, V] in v.dtype, final_state | None)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..norms import torch_gated_rms_norm


L2NORM_EPS = 1e-6  # fla's l2norm: x / sqrt(sum(x^2) + eps)


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """Normalise the last dim as fla does: ``x / sqrt(sum(x**2) + eps)`` (no clamp)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # float64 stays float64 so tests can build a float64 ground truth; everything else -> float32.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens) -> int:
    """Validate shapes and return N, the number of sequences (the rows of initial_state)."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, H, K], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, H, _ = q.shape
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    for name, t in (("g", g), ("beta", beta)):
        if t.shape != (B, T, H):
            raise ValueError(f"{name} must be [B, T, H] = [{B}, {T}, {H}], got {tuple(t.shape)}")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"with cu_seqlens the batch size must be 1 (packed sequences), got B={B}")
        if cu_seqlens.dim() != 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T:
            raise ValueError(f"cu_seqlens must be 1-D, start at 0 and end at T={T}, got {cu_seqlens.tolist()}")
        n = cu_seqlens.numel() - 1
    else:
        n = B
    if initial_state is not None and initial_state.shape != (n, H, q.shape[-1], v.shape[-1]):
        raise ValueError(
            f"initial_state must be [N, H, K, V] = [{n}, {H}, {q.shape[-1]}, {v.shape[-1]}], "
            f"got {tuple(initial_state.shape)}"
        )
    return n


def _run(core, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel):
    """Shared prologue/epilogue: validation, dtype, l2norm, [B,T,H,*] -> [B,H,T,*], cu_seqlens loop."""
    _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    dt, out_dtype = _compute_dtype(v), v.dtype
    if scale is None:
        scale = q.shape[-1] ** -0.5
    q, k, v, g, beta = (t.to(dt).transpose(1, 2) for t in (q, k, v, g, beta))  # head-major
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    h0 = initial_state.to(dt) if initial_state is not None else None

    if cu_seqlens is None:
        o, ht = core(q, k, v, g, beta, scale, h0)
    else:
        # Independent sequences packed in one row: run each segment from its own state.
        outs, states = [], []
        bounds = cu_seqlens.tolist()
        for i, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
            seg = [t[:, :, bos:eos] for t in (q, k, v, g, beta)]
            o_i, h_i = core(*seg, scale, h0[i : i + 1] if h0 is not None else None)
            outs.append(o_i)
            states.append(h_i)
        o, ht = torch.cat(outs, dim=2), torch.cat(states, dim=0)
    o = o.transpose(1, 2).to(out_dtype)
    return o, (ht if output_final_state else None)


def _naive_core(q, k, v, g, beta, scale, h0):
    # Scalar loops over batch, head and time; slow but obviously right.
    B, H, T, K = q.shape
    V = v.shape[-1]
    o = q.new_zeros(B, H, T, V)
    ht = q.new_zeros(B, H, K, V)
    for b in range(B):
        for h in range(H):
            S = h0[b, h].clone() if h0 is not None else q.new_zeros(K, V)
            rows = []
            for t in range(T):
                S = S * torch.exp(g[b, h, t])
                u = beta[b, h, t] * (v[b, h, t] - S.T @ k[b, h, t])
                S = S + torch.outer(k[b, h, t], u)
                rows.append(scale * (S.T @ q[b, h, t]))
            if T:
                o[b, h] = torch.stack(rows)
            ht[b, h] = S
    return o, ht


def torch_naive_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    *,
    cu_seqlens: torch.LongTensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ground-truth gated delta rule: one python step per (batch, head, token).

    Args:
        q, k: ``[B, T, H, K]``. v: ``[B, T, H, V]``. g (log decay, <= 0), beta: ``[B, T, H]``.
        scale: defaults to ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` (N = B, or the number of sequences with cu_seqlens).
        output_final_state: also return the state after the last token.
        cu_seqlens: ``[N + 1]`` boundaries of sequences packed in one row (B must be 1).
        use_qk_l2norm_in_kernel: L2-normalise q and k over K first (fla's eps 1e-6).

    Returns:
        ``(o [B, T, H, V] in v.dtype, final_state [N, H, K, V] float32 (float64 for float64 input) or None)``.
        Computes in float64 when v is float64, else float32.
    """
    return _run(_naive_core, q, k, v, g, beta, scale, initial_state, output_final_state,
                cu_seqlens, use_qk_l2norm_in_kernel)


def _recurrent_core(q, k, v, g, beta, scale, h0):
    # One step per token, vectorised over batch and head: cheap for T=1 decode.
    B, H, T, K = q.shape
    V = v.shape[-1]
    S = h0 if h0 is not None else q.new_zeros(B, H, K, V)
    q = q * scale
    decay = g.exp()
    outs = []
    for t in range(T):
        S = S * decay[:, :, t, None, None]
        k_t = k[:, :, t]
        err = v[:, :, t] - torch.einsum("bhkv,bhk->bhv", S, k_t)
        S = S + k_t.unsqueeze(-1) * (beta[:, :, t, None] * err).unsqueeze(-2)
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, :, t]))
    o = torch.stack(outs, dim=2) if outs else v.new_zeros(B, H, 0, V)
    return o, S


def torch_fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    *,
    cu_seqlens: torch.LongTensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token gated delta rule vectorised over B and H; the decode (T=1) path.

    Same arguments, shapes and returns as :func:`torch_naive_gated_delta_rule`
    (q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, g/beta ``[B, T, H]``, state ``[N, H, K, V]``).
    Differentiable (no in-place updates), but O(T) sequential steps: use the chunked form for prefill.
    """
    return _run(_recurrent_core, q, k, v, g, beta, scale, initial_state, output_final_state,
                cu_seqlens, use_qk_l2norm_in_kernel)


def _chunk_core(q, k, v, g, beta, scale, h0, chunk_size):
    B, H, T, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    pad = (-T) % C
    if pad:
        # Padded tokens have g=0, beta=0, k=0: they neither decay nor write the state.
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = (torch.nn.functional.pad(t, (0, pad)) for t in (g, beta))
    n = (T + pad) // C
    q, k, v = (t.reshape(B, H, n, C, -1) for t in (q, k, v))
    g, beta = g.reshape(B, H, n, C), beta.reshape(B, H, n, C)
    q = q * scale

    gc = g.cumsum(-1)  # cumulative log decay inside each chunk
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # exp(gc_i - gc_j) for j <= i, 0 above the diagonal; mask before exp so nothing overflows.
    diff = gc.unsqueeze(-1) - gc.unsqueeze(-2)
    decay = torch.where(causal, diff, torch.full_like(diff, float("-inf"))).exp()

    # UT transform: (I + L) [u | w] = [beta*v | beta*exp(gc)*k], L strictly lower,
    # L_ij = beta_i exp(gc_i - gc_j) k_i.k_j. Then the chunk's writes are u - w @ S_start.
    k_beta = k * beta.unsqueeze(-1)
    L = (k_beta @ k.transpose(-1, -2)) * decay
    A = L.tril(-1) + torch.eye(C, dtype=q.dtype, device=q.device)
    rhs = torch.cat([v * beta.unsqueeze(-1), k_beta * gc.exp().unsqueeze(-1)], dim=-1)
    sol = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    u, w = sol[..., :V], sol[..., V:]

    qk = (q @ k.transpose(-1, -2)) * decay  # intra-chunk scores, diagonal included
    q_decayed = q * gc.exp().unsqueeze(-1)
    g_last = gc[..., -1]
    k_to_end = k * (g_last.unsqueeze(-1) - gc).exp().unsqueeze(-1)

    S = h0 if h0 is not None else q.new_zeros(B, H, K, V)
    outs = []
    for i in range(n):  # sequential only across chunks
        v_new = u[:, :, i] - w[:, :, i] @ S
        outs.append(q_decayed[:, :, i] @ S + qk[:, :, i] @ v_new)
        S = S * g_last[:, :, i, None, None].exp() + k_to_end[:, :, i].transpose(-1, -2) @ v_new
    o = torch.cat(outs, dim=2)[:, :, :T] if outs else v.new_zeros(B, H, 0, V)
    return o, S


def torch_chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    *,
    cu_seqlens: torch.LongTensor | None = None,
    use_qk_l2norm_in_kernel: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked (WY / UT-transform) gated delta rule for prefill; differentiable.

    Same arguments, shapes and returns as :func:`torch_naive_gated_delta_rule`
    (q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, g/beta ``[B, T, H]``, state ``[N, H, K, V]``).
    T is padded to a multiple of ``chunk_size``; work inside a chunk is batched matmuls and one
    triangular solve, and only ``T / chunk_size`` steps are sequential. Memory is O(T * chunk_size).

    Example:
        >>> import torch
        >>> B, T, H, K, V = 1, 100, 2, 16, 32
        >>> q, k = torch.randn(B, T, H, K), torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1)
        >>> v, beta = torch.randn(B, T, H, V), torch.rand(B, T, H)
        >>> g = -torch.rand(B, T, H)
        >>> o, ht = torch_chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True)
        >>> o.shape, ht.shape
        (torch.Size([1, 100, 2, 32]), torch.Size([1, 2, 16, 32]))
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")

    def core(*args):
        return _chunk_core(*args, chunk_size)

    return _run(core, q, k, v, g, beta, scale, initial_state, output_final_state,
                cu_seqlens, use_qk_l2norm_in_kernel)


def torch_gdn_gates(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor):
    """A Gated DeltaNet layer's gates from its raw a/b projections [..., H]: (g, beta) with the log decay
    g = -exp(A_log) * softplus(a + dt_bias) in float32 and beta = sigmoid(b) in b's dtype."""
    return -A_log.float().exp() * F.softplus(a.float() + dt_bias.float()), b.sigmoid()


def torch_gated_delta_rule_decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    state: torch.Tensor,
    scale: float | None = None,
    gate: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-5,
) -> torch.Tensor:
    """One decode token of a Gated DeltaNet layer from its activations, with the gates computed here.

    q, k [B, H*K] and v [B, H*V] (after the short convs), a and b [B, H] (raw projections); the float32
    state [B, H, K, V] is updated in place. beta = sigmoid(b), g = -exp(A_log) * softplus(a + dt_bias), q and
    k are L2-normalised and q scaled by `scale` (default K^-0.5). Returns o [B, H*V] in v's dtype; given
    `gate` [B, H*V] and `norm_weight` [V], the layer's output norm `gated_rms_norm(o, norm_weight, gate)` per head.
    """
    batch, heads, d_k, d_v = state.shape
    scale = d_k**-0.5 if scale is None else scale
    g, beta = torch_gdn_gates(a, b, A_log, dt_bias)
    beta = beta.float()
    q = l2norm(q.float().view(batch, heads, d_k)) * scale
    k = l2norm(k.float().view(batch, heads, d_k))
    S = state * g.exp()[..., None, None]
    err = v.float().view(batch, heads, d_v) - torch.einsum("bhkv,bhk->bhv", S, k)
    S = S + k[..., None] * (beta[..., None] * err)[..., None, :]
    state.copy_(S)
    o = torch.einsum("bhkv,bhk->bhv", S, q).to(v.dtype).reshape(batch, heads * d_v)
    return o if gate is None else gated_output_norm(o, gate, norm_weight, norm_eps)


def gated_output_norm(o: torch.Tensor, gate: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                      norm=torch_gated_rms_norm) -> torch.Tensor:
    """The layer's output norm `gated_rms_norm` per head: o and gate [B, H*V], norm_weight [V]. `norm`: the gated
    RMSNorm that computes it (its torch definition, or the dispatched op `norms.gated_rms_norm`)."""
    batch, head_dim = o.shape[0], norm_weight.shape[0]
    return norm(o.view(batch, -1, head_dim), norm_weight, gate.reshape(batch, -1, head_dim), eps).view(batch, -1)
