"""fla's Triton causal conv1d behind a guarded, lazy import, mapped onto our state layout.

fla (0.6, ``fla.modules.causal_conv1d.causal_conv1d``; ``fla.modules.convolution`` is an alias)
keeps a conv cache of ``[N, D, W]``: the last W inputs, oldest first. For a prefill its kernel reads
only slots ``1..W-1`` of the cache, and its final state is the last W inputs. Our state is
``[N, D, W-1]``, so: fla cache = ``pad(state, (1, 0))`` and our final state = ``fla_final[..., 1:]``.
Decode (T=1) stays on the torch path (a W-tap dot product per channel), see ``__init__.py``.
"""

from __future__ import annotations

import functools

import torch.nn.functional as F

from ..tuned import seed_for_current_device as seed_tuned_kernels


@functools.lru_cache(maxsize=1)
def load_fla_causal_conv1d():
    """Import fla's conv once. Returns ``(kernel, None)`` or ``(None, reason)``."""
    try:
        from fla.modules.causal_conv1d import causal_conv1d
    except ImportError as e:
        return None, f"cannot import fla: {e}"
    except Exception as e:  # fla can fail oddly at import (Triton/driver probing)
        return None, f"fla failed to import: {type(e).__name__}: {e}"
    seed_tuned_kernels()  # recorded autotuning choices, before any kernel's first call
    return causal_conv1d, None


def fla_causal_conv1d(x, weight, bias=None, activation="silu", initial_state=None, output_final_state=False,
                      cu_seqlens=None):
    """fla's conv with our ``[N, D, W-1]`` state layout; shapes as ``torch_causal_conv1d``. CUDA only."""
    kernel, reason = load_fla_causal_conv1d()
    if kernel is None:
        raise RuntimeError(f"fla causal_conv1d is unavailable: {reason}")
    cache = F.pad(initial_state, (1, 0)) if initial_state is not None else None
    y, final = kernel(
        x=x, weight=weight, bias=bias, initial_state=cache, output_final_state=output_final_state,
        activation=activation, backend="triton", cu_seqlens=cu_seqlens,
    )
    return y, (final[..., 1:] if final is not None else None)
