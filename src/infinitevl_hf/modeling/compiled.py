"""Small elementwise functions that `torch.compile` fuses into one kernel each when they run for inference
on a GPU: the norms, rotary embeddings and SiLU gates of the vision tower and of the decoder's prefill (a few
float32 passes over thousands of tokens per call otherwise)."""

from __future__ import annotations

import functools
from typing import Callable

import torch


def compiled_for_inference(fn: Callable) -> Callable:
    """`fn`, run through `torch.compile` when its first argument is a CUDA tensor and autograd is off; as it is
    otherwise (CPU, training, or inside a caller's own compiled graph). Compiles on first use.

    Every dim but the last of each tensor argument (tokens, batch, heads) is compiled as a variable, so one
    kernel serves every call length; the last (feature) dim stays a constant, which lets the compiler vectorise
    the loads. (`dynamic=True` would make it a variable too, and the kernels ran at half the bandwidth.)"""
    compiled = None

    @functools.wraps(fn)
    def run(*args):
        nonlocal compiled
        if torch.is_grad_enabled() or not args[0].is_cuda or torch.compiler.is_compiling():
            return fn(*args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=False)
        for arg in args:
            if isinstance(arg, torch.Tensor):
                for dim in range(arg.dim() - 1):
                    torch._dynamo.maybe_mark_dynamic(arg, dim)
        return compiled(*args)

    return run
