"""Checks of a saved state's fields (counters and tensors), each refused with a `ValueError` naming the field.

Shared by `InfiniteVLCache.from_state_dict` (the cache's counters and tensors) and `stream_state` (a streaming
session's settings and waiting frames), so that both name a bad field the same way.
"""

from __future__ import annotations

import torch

# Largest counter a real stream reaches: 2**53, exact in JSON and float64.
MAX_COUNT = 2**53
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_count(value, field: str, low: int = 0, high: int = MAX_COUNT) -> int:
    """`value` as a whole number in [low, high] (a bool, float or string is refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"The saved state's {field} must be a whole number in [{low}, {high}], got {value!r}.")
    return value


def check_tensor(tensors: dict, name: str, shape: tuple, dtypes: tuple) -> torch.Tensor:
    """`tensors[name]`, present, of one of `dtypes`, of `shape` (None: any size) and, for floats, finite."""
    if name not in tensors:
        raise ValueError(f"The saved state lacks tensor {name!r}.")
    tensor = tensors[name]
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"The saved state's {name!r} is a {type(tensor).__name__}, not a tensor.")
    if tensor.dtype not in dtypes:
        raise ValueError(f"The saved state's tensor {name!r} is {tensor.dtype}, expected {' or '.join(map(str, dtypes))}.")
    if tensor.dim() != len(shape) or any(want is not None and got != want for got, want in zip(tensor.shape, shape)):
        want = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
        raise ValueError(f"The saved state's tensor {name!r} has shape {list(tensor.shape)}, expected {want}.")
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise ValueError(f"The saved state's tensor {name!r} holds NaN or inf.")
    return tensor


def refuse_extra(tensors, expected: set) -> None:
    """Refuse tensors that no field of the state accounts for, naming (up to five of) them."""
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ValueError(f"The saved state holds tensors this model's state does not have: {extra[:5]}.")


__all__ = ["MAX_COUNT", "FLOAT_DTYPES", "check_count", "check_tensor", "refuse_extra"]
