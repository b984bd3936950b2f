"""The comparison the interpreted kernel scripts (`interpreted_*_kernels.py`, run with TRITON_INTERPRET=1) share:
each prints one `ok  `/`FAIL` line, and a script exits non-zero when `failures` is not empty."""

import torch

# The interpreter rounds float32 -> bfloat16 differently from the GPU (not to nearest even), and a product
# with its gate rounds four times on the way, so bfloat16 agrees to a few units in the last place; float32
# must agree to accumulation order.
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 3e-2}
failures = []


def check(name, got, expected, dtype):
    """Relative error of `got` against `expected` within TOLERANCE[dtype] (None must meet None)."""
    if got is None or expected is None:
        ok, error = got is None and expected is None, 0.0
    else:
        assert got.shape == expected.shape and got.dtype == expected.dtype, (name, got.shape, expected.shape, got.dtype, expected.dtype)
        got, expected = got.float(), expected.float()
        error = ((got - expected).norm() / expected.norm().clamp_min(1e-30)).item()
        ok = error <= TOLERANCE[dtype]
    print(f"{'ok  ' if ok else 'FAIL'} {name:40s} {str(dtype):15s} relative error {error:.2e}")
    if not ok:
        failures.append(name)
