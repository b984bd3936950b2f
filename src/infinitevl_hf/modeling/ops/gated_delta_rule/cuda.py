"""fla's Triton gated-delta-rule kernels behind a guarded, lazy import, with thin wrappers.

fla 0.6 signatures differ from ours in two ways handled here: ``fused_recurrent_gated_delta_rule``
takes ``gk`` as its 5th positional argument (so everything is passed by keyword), and the chunk
kernel returns ``o`` in q's dtype (we return v's dtype). fla's fused_recurrent has no backward.
"""

from __future__ import annotations

import functools

from ..tuned import seed_for_current_device as seed_tuned_kernels


@functools.lru_cache(maxsize=1)
def load_fla_gated_delta_rule():
    """Import fla's kernels once. Returns ``(kernels, None)`` or ``(None, reason)``."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except ImportError as e:
        return None, f"cannot import fla: {e}"
    except Exception as e:  # fla can fail oddly at import (Triton/driver probing)
        return None, f"fla failed to import: {type(e).__name__}: {e}"
    seed_tuned_kernels()  # recorded autotuning choices, before any kernel's first call
    return {"chunk": chunk_gated_delta_rule, "fused_recurrent": fused_recurrent_gated_delta_rule}, None


def _kernel(name: str):
    kernels, reason = load_fla_gated_delta_rule()
    if kernels is None:
        raise RuntimeError(f"fla gated delta rule kernels are unavailable: {reason}")
    return kernels[name]


def fla_chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               *, cu_seqlens=None, use_qk_l2norm_in_kernel=False):
    """fla's chunked kernel; shapes as ``torch_chunk_gated_delta_rule``. CUDA tensors only."""
    o, ht = _kernel("chunk")(
        q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
    )
    return o.to(v.dtype), ht


def fla_fused_recurrent_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                                         *, cu_seqlens=None, use_qk_l2norm_in_kernel=False):
    """fla's fused recurrent kernel (forward only); shapes as ``torch_fused_recurrent_gated_delta_rule``."""
    o, ht = _kernel("fused_recurrent")(
        q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
    )
    return o.to(v.dtype), ht
