"""Launching the package's Triton kernels with less host work per call than `kernel[grid](...)`.

At one decode token the module path's speed is host time, and most of its launches are the package's own
small Triton kernels. `kernel[grid](*args)` binds and specialises every argument, hashes the result and looks
up the compiled kernel on each call (about 23 us per launch on an H200 host, against 9 us for the compiled
kernel's own launcher). `launch(kernel, grid, *args, **kwargs)` takes that path once per *signature* and then
calls the compiled kernel directly. A signature is everything Triton specialises on, or more: each tensor's
dtype and 16-byte alignment, each int and bool itself, the type of each float, the keyword arguments
(constexprs and launch options, with their types), and the current device. Calls that differ in any of these
compile and look up as before. Triton settings changed after a kernel's first call of a signature (its debug or
instrumentation modes) are not seen by that signature's later launches.

The direct launch passes every parameter in the kernel's order, constexprs included: the convention of the
Triton releases read for this (`VERIFIED`). Any other release, the CPU interpreter, callable grids, a kernel
with pre-run hooks, and calls inside a graph being compiled (which traces `kernel[grid]`) take `kernel[grid]`;
so does every launch with ``INFINITEVL_DIRECT_LAUNCH=0`` set before the package is imported. Launch hooks
(profilers) still run: the compiled kernel's launcher calls them.
"""

from __future__ import annotations

import itertools
import os
import re

import torch

try:  # (transformers' remote-code import check skips try blocks: Triton stays optional)
    import triton
    from triton.runtime import driver
except ImportError as error:
    raise ImportError("the Triton launcher needs Triton") from error
try:
    from triton import knobs
except ImportError:  # releases before `triton.knobs` are older than VERIFIED: they launch through kernel[grid]
    knobs = None

# Triton releases whose `JITFunction.run` hands the compiled kernel's launcher every bound argument, constexprs
# included (read in the `runtime/jit.py` of 3.6, 3.7, 3.8 and 3.9); 3.6 also runs in the GPU tests.
VERIFIED = ((3, 6), (3, 9))
SWITCH_ENV = "INFINITEVL_DIRECT_LAUNCH"  # 0: every launch through kernel[grid]
# Signatures kept per kernel; a kernel called with ever new ints (prompt lengths) starts over past this many.
MAX_SIGNATURES = 512


def _release(version: str) -> tuple[int, int]:
    major, minor = (version.split(".") + ["0"])[:2]
    return int(major), int(re.match(r"\d*", minor).group() or 0)


def direct_launch_available() -> bool:
    """Whether launches go direct: a verified Triton release, not its CPU interpreter, not switched off."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or knobs is None:
        return False
    if os.environ.get(SWITCH_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return VERIFIED[0] <= _release(triton.__version__) <= VERIFIED[1]


_DIRECT = direct_launch_available()
_signatures: dict = {}  # kernel -> {signature: (compiled kernel, the parameters after the positional ones)}
# torch.cuda.current_device() less its initialisation check (a launch has CUDA tensors, so CUDA is initialised)
_current_device = getattr(torch._C, "_cuda_getDevice", torch.cuda.current_device)


def cdiv(a: int, b: int) -> int:
    """`triton.cdiv` for host code: Triton's is a jit function, several microseconds a call from Python."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """`triton.next_power_of_2` for host code (n >= 1)."""
    return 1 << (n - 1).bit_length()


def launch(kernel, grid: tuple, *args, **kwargs):
    """`kernel[grid](*args, **kwargs)` for a `triton.jit` kernel and a grid tuple of one to three ints."""
    return _launch(kernel, grid, args, kwargs, None)


class Launch:
    """`launch` with the keyword arguments (constexprs, launch options) fixed: `Launch(kernel, **kwargs)(grid, *args)`
    is `launch(kernel, grid, *args, **kwargs)`, less the keywords' share of the signature on every call (a caller
    that launches one kernel with a few fixed sets of constexprs keeps one `Launch` per set)."""

    __slots__ = ("kernel", "kwargs", "keywords")

    def __init__(self, kernel, **kwargs):
        self.kernel, self.kwargs = kernel, kwargs
        self.keywords = _keywords_token(kwargs)

    def __call__(self, grid: tuple, *args):
        return _launch(self.kernel, grid, args, self.kwargs, self.keywords)


_KEYWORDS: dict = {}  # the keyword arguments' share of a signature -> a token standing for it
_tokens = itertools.count()  # (never reused: a `Launch` keeps its token past a clearing of _KEYWORDS)


def _keywords_token(kwargs: dict):
    """A small hashable token for the keyword arguments' share of a signature (names, types and values). A tensor
    among them (which `_launch` never keeps a signature for) gets a token of its own, not kept."""
    if any(isinstance(value, torch.Tensor) for value in kwargs.values()):
        return next(_tokens)
    signature = tuple([(name, type(value), value) for name, value in kwargs.items()])
    token = _KEYWORDS.get(signature)
    if token is None:
        if len(_KEYWORDS) >= MAX_SIGNATURES * 8:  # (bounded as the signatures are; a token is only a key)
            _KEYWORDS.clear()
        token = _KEYWORDS[signature] = next(_tokens)
    return token


def _launch(kernel, grid: tuple, args: tuple, kwargs: dict, keywords):
    # (a graph being compiled traces `kernel[grid]` itself, and nothing else of this function)
    if torch.compiler.is_compiling() or not _DIRECT or callable(grid) or getattr(kernel, "pre_run_hooks", None):
        return kernel[grid](*args, **kwargs)
    device = _current_device()
    if keywords is None:
        keywords = _keywords_token(kwargs)
    # What Triton specialises on: a tensor's dtype and 16-byte alignment, an int or bool itself, a float's type.
    facts = tuple([(a.dtype, not a.data_ptr() & 15) if isinstance(a, torch.Tensor)
                   else float if type(a) is float else (type(a), a) for a in args])
    signature = (device, keywords, facts)
    known = _signatures.get(kernel)
    hit = known.get(signature) if known is not None else None
    if hit is None:
        compiled = kernel[grid](*args, **kwargs)
        if compiled is not None and hasattr(compiled, "packed_metadata") and not any(
            isinstance(value, torch.Tensor) for value in kwargs.values()  # tensors are passed by position here
        ):
            known = _signatures.setdefault(kernel, {})
            if len(known) >= MAX_SIGNATURES:
                known.clear()
            rest = tuple(kwargs[p.name] if p.name in kwargs else p.default for p in kernel.params[len(args):])
            known[signature] = (compiled, rest)
        return compiled
    compiled, rest = hit
    size = len(grid)
    grid = (grid[0], grid[1] if size > 1 else 1, grid[2] if size > 2 else 1)
    stream = (_stream_getter or _set_stream_getter())(device)
    every = args + rest
    # The call `JITFunction.run` makes once it has the compiled kernel. The launch hooks (profilers) are read on
    # every call; only where one is set is there launch metadata to build and a hook to hand over (Triton's own
    # launch builds the metadata and calls the hooks even where they are empty chains).
    runtime = knobs.runtime
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    if not _hooked(enter) and not _hooked(leave):
        compiled.run(*grid, stream, compiled.function, compiled.packed_metadata, None, None, None, *every)
    else:
        compiled.run(*grid, stream, compiled.function, compiled.packed_metadata,
                     compiled.launch_metadata(grid, stream, *every), enter, leave, *every)
    return compiled


def _hooked(hook) -> bool:
    """Whether a launch hook is set: not None and, for the chains of hooks newer releases keep (`HookChain`), not
    empty (an empty chain calls nothing)."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return calls is None or bool(calls)


_stream_getter = None  # the active driver's get_current_stream, looked up at the first direct launch


def _set_stream_getter():
    # (not at import: the driver initialises CUDA when first asked, and this module imports on CPU machines too)
    global _stream_getter
    _stream_getter = driver.active.get_current_stream
    return _stream_getter
