"""The one place that decides, per call, whether an op runs on fla's kernels or in torch.

fla is optional: it may be missing, or fail to import on a machine without a working Triton.
Each op registers a loader (in its ``cuda.py``) that imports fla lazily and reports why it could
not; ``select_backend`` then picks "fla" only when every tensor is on CUDA, the loader succeeded
and ``INFINITEVL_DISABLE_FLA`` is not set. The choice (and the reason fla was skipped) is logged
once per op and outcome.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Callable

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)

DISABLE_ENV = "INFINITEVL_DISABLE_FLA"
TORCH, FLA = "torch", "fla"

# op name -> loader returning (kernels or None, reason fla is unavailable or None)
_LOADERS: dict[str, Callable[[], tuple[object | None, str | None]]] = {}
_LOGGED: set[tuple[str, str, str]] = set()


def register_fla_op(op_name: str, loader: Callable[[], tuple[object | None, str | None]]) -> None:
    """Register the lazy fla loader of ``op_name`` (called by each op package at import)."""
    _LOADERS[op_name] = loader


def fla_disabled() -> bool:
    """True when ``INFINITEVL_DISABLE_FLA`` is 1/true/yes (read at call time)."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _decide(op_name: str, tensors: tuple[torch.Tensor | None, ...]) -> tuple[str, str]:
    present = [t for t in tensors if t is not None]
    if not present or not all(t.is_cuda for t in present):
        return TORCH, "inputs are not all on CUDA"
    if fla_disabled():
        return TORCH, f"{DISABLE_ENV} is set"
    loader = _LOADERS.get(op_name)
    if loader is None:
        return TORCH, "no fla kernel is registered for this op"
    kernels, reason = loader()
    if kernels is None:
        return TORCH, f"fla is unavailable ({reason})"
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        broken = fla_backward_problem(present[0].device)
        if broken is not None:
            return TORCH, broken
    return FLA, "inputs on CUDA and fla imported"


@functools.lru_cache(maxsize=None)
def fla_backward_problem(device: torch.device) -> str | None:
    """Why fla's backward cannot be trusted on `device`, or None.

    fla 0.6 refuses gradients on Hopper (sm_90) with Triton >= 3.4.0 and < 3.7.1 unless tilelang is
    installed: those Triton releases miscompile its gated `chunk_bwd_dqkwg` kernel. Training then runs on
    the torch reference instead of failing.
    """
    if torch.cuda.get_device_capability(device)[0] != 9:
        return None
    try:
        import triton
    except ImportError:
        return None
    version = tuple(int(part) for part in triton.__version__.split("+")[0].split(".")[:3] if part.isdigit())
    if not ((3, 4, 0) <= version < (3, 7, 1)):
        return None
    if importlib.util.find_spec("tilelang") is not None:
        return None
    return (f"gradients needed, and fla's backward is unreliable with Triton {triton.__version__} on Hopper "
            "(upgrade Triton to >= 3.7.1 or install tilelang)")


def select_backend(op_name: str, *tensors: torch.Tensor | None) -> str:
    """Return ``"fla"`` or ``"torch"`` for one call of ``op_name`` on ``tensors`` (None ignored)."""
    backend, reason = _decide(op_name, tensors)
    key = (op_name, backend, reason)
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.info(f"{op_name}: using the {backend} backend ({reason}).")
    return backend
