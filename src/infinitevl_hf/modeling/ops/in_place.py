"""`state_in_place` for the ops that carry a state (the convolution, the delta rules): the new state written over the
given one, by the kernel itself where it can, else copied."""

from __future__ import annotations

import torch


def overwritten(initial_state: torch.Tensor | None, final: torch.Tensor) -> torch.Tensor:
    """`final` copied over `initial_state` where the two match in shape and dtype (then `initial_state`), else
    `final` (what a cache would then store: `cache._store` copies on the same terms)."""
    if initial_state is None or final is initial_state:
        return final
    if initial_state.shape != final.shape or initial_state.dtype != final.dtype:
        return final
    return initial_state.copy_(final)


def run_state_in_place(impl, args: tuple, options: dict, initial_state: torch.Tensor | None, state_shape: tuple,
                       state_dtype: torch.dtype):
    """`impl` (a `dispatch.Implementation` returning (output, final state)) with its final state written over
    `initial_state`: by the package's Triton kernels themselves (their `final_state=`) where the state has the
    shape and dtype they write, else computed beside it and copied (`overwritten`)."""
    if (impl.name == "triton" and initial_state is not None and initial_state.shape == state_shape
            and initial_state.dtype == state_dtype):
        return impl.fn(*args, **options, final_state=initial_state)
    out, final = impl.fn(*args, **options)
    return out, overwritten(initial_state, final)
