"""Small elementwise functions that `torch.compile` fuses into one kernel each when they run for inference
on a GPU (the vision tower's norms, rotary embedding and SiLU gate: a few float32 passes over 8K tokens
per streamed call otherwise)."""

from __future__ import annotations

import functools
from typing import Callable

import torch


def compiled_for_inference(fn: Callable) -> Callable:
    """`fn`, run through `torch.compile(fn, dynamic=True)` when its first argument is a CUDA tensor and autograd
    is off; as it is otherwise (CPU, training, or inside a caller's own compiled graph). Compiles on first use."""
    compiled = None

    @functools.wraps(fn)
    def run(*args):
        nonlocal compiled
        if torch.is_grad_enabled() or not args[0].is_cuda or torch.compiler.is_compiling():
            return fn(*args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)
        return compiled(*args)

    return run
