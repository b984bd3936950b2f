"""Triton kernels compiled side by side on worker threads, ahead of their first launch.

Triton compiles a kernel when it is first launched, and a fresh process meets the model's kernels one after
another: on an H200 the first `generate()` spent 8.5 s compiling 29 kernels and 5.6 s more building their
launchers, most of it waiting on ptxas and (Triton 3.6) on the C compiler. Those are separate processes, so
several compiles can overlap.

`compile_ahead(run)` calls `run()` once with every first launch of a Triton kernel skipped and handed to a thread
pool instead (through Triton's `jit_cache_hook`, which is asked before each compile), then waits for the pool. The
kernels are then in Triton's cache with their launchers built, and the real calls that follow compile nothing.

What `run()` must be: a call whose results are thrown away (the warm-up of a region about to be captured as a CUDA
graph, on a fork of the cache), whose host control flow does not read tensor values (a captured region cannot),
and in which no value a Triton kernel writes becomes an index or an address. The skipped kernels leave their
outputs unwritten, and the torch ops and the kernels compiled already run on that garbage: floats are harmless, an
out-of-range index would be a device-side error. In this package every Triton kernel writes floats; indices (ring
slots, feature slots, positions) come from torch ops on the inputs.

Only the thread that called `compile_ahead` skips launches; other threads' kernels and an autotuner's timing runs
launch as usual. Two limits, both costing speed only: a kernel a worker has just published may still be loading
when the pass launches it again (that launch fails, the pass stops, and the rest compile at first launch as
before); and while the hook is set, Triton 3.6 serialises every compile's specialisation, which fails for a kernel
taking a Triton function as a constant (the pass stops there too; another thread's such first launch would fail
for the pass's few seconds).
"""

from __future__ import annotations

import inspect
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

SWITCH_ENV = "INFINITEVL_COMPILE_AHEAD"
_active = threading.Lock()  # one compile-ahead pass at a time: the hook is process-wide
_owner: int | None = None  # the thread running the pass


def compile_ahead_problem() -> str | None:
    """Why kernels cannot be compiled ahead here, or None when they can."""
    if os.environ.get(SWITCH_ENV, "1") == "0":
        return f"{SWITCH_ENV}=0"
    try:
        from triton import knobs
        from triton.runtime.jit import JITFunction
    except ImportError:
        return "this Triton has no `triton.knobs` (Triton 3.4 or newer has it)"
    if not hasattr(knobs.runtime, "jit_cache_hook") or not hasattr(JITFunction, "preload"):
        return "this Triton has no `jit_cache_hook` or `JITFunction.preload`"
    from triton.runtime.autotuner import Autotuner

    bench = getattr(Autotuner, "_bench", None)
    bench = inspect.unwrap(bench) if callable(bench) else None  # a profiler's wrapper still calls it (first_call.py)
    if bench is None or not bench.__code__.co_filename.endswith("autotuner.py"):  # what `_in_autotuner_timing` finds
        return "this Triton's autotuner times its configs elsewhere than `Autotuner._bench`"
    return None


def _in_autotuner_timing(frame, depth: int = 16) -> bool:
    """Whether a Triton autotuner is timing its candidates up the stack (those launches must run to be timed)."""
    while frame is not None and depth:
        code = frame.f_code
        if code.co_name == "_bench" and code.co_filename.endswith("autotuner.py"):
            return True
        frame, depth = frame.f_back, depth - 1
    return False


def _compile(jit_function, specialization_data: str, device: int) -> bool:
    """Compile one kernel into its function's cache and build its launcher (the two slow parts of a first launch);
    False when another hook declined the compile."""
    torch.cuda.set_device(device)
    kernel = jit_function.preload(specialization_data)
    if kernel is None:
        return False
    kernel._init_handles()
    return True


def compile_ahead(run: Callable[[], object], workers: int | None = None) -> int | None:
    """Call `run()` once with each Triton kernel it launches for the first time compiled on a worker thread instead
    of launched (for the current CUDA device, where Triton launches); wait for the compiles. Returns how many
    kernels were compiled, or None when the pass did not run to its end: not available (`compile_ahead_problem`),
    another thread's pass running, or `run()` raised (logged; what was submitted still compiles). The caller's
    own calls then compile what is left as usual.

    A compile that fails on a worker is dropped (logged at debug level); the kernel's next real launch compiles
    it again and raises the error there. Called again from inside `run()` it raises: the inner call's own
    launches (a capture, say) would be skipped too."""
    global _owner
    if _owner == threading.get_ident():
        raise RuntimeError("compile_ahead() was called inside its own pass, whose launches it would skip")
    if compile_ahead_problem() is not None or not _active.acquire(blocking=False):
        return None
    from triton import knobs

    owner, previous = threading.get_ident(), knobs.runtime.jit_cache_hook
    _owner = owner
    index = torch.cuda.current_device()
    pool = ThreadPoolExecutor(max_workers=workers or max(2, min(8, os.cpu_count() or 2)),
                              thread_name_prefix="infinitevl-compile")
    submitted, jobs = set(), []

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled, **rest):
        if threading.get_ident() != owner or is_manual_warmup or _in_autotuner_timing(sys._getframe(1)):
            return previous(key=key, repr=repr, fn=fn, compile=compile, is_manual_warmup=is_manual_warmup,
                            already_compiled=already_compiled, **rest) if previous else None
        name = (id(fn.jit_function), key)
        if name not in submitted:
            submitted.add(name)
            jobs.append((repr, pool.submit(_compile, fn.jit_function, compile["specialization_data"], index)))
        return True  # skip this compile and launch: the pool compiles it

    knobs.runtime.jit_cache_hook = hook
    finished = False
    try:
        run()
        finished = True
    except Exception as error:  # noqa: BLE001 - the real warm-ups that follow run the same call and report it
        logger.info("The compile-ahead pass stopped early (%s: %s); the kernels it had not reached compile at their "
                    "first launch.", type(error).__name__, error)
    finally:
        if knobs.runtime.jit_cache_hook is hook:  # not one another thread set meanwhile
            knobs.runtime.jit_cache_hook = previous
        pool.shutdown(wait=True)
        _owner = None
        _active.release()
    compiled = 0
    for repr, job in jobs:
        if job.exception() is None:
            compiled += bool(job.result())
        else:
            logger.debug("Compiling %s ahead failed (%s); its first launch compiles it.", repr, job.exception())
    return compiled if finished else None
