"""The one place that decides, per call, which implementation of an op runs.

Every op (`op(name)`) holds its implementations in order of preference, the torch reference last. Each faster
one has a fit check: called with the op's arguments, it returns the reason it cannot serve the call (not on
CUDA, no Triton, a stride the kernel does not take...) or None. The first that fits runs; the reference always
can. The choice, and the reason the preferred implementation was skipped, is logged once per
(op, implementation, reason).

The torch reference is forced
- for every op by ``INFINITEVL_TORCH_OPS=1`` (read at call time; a compiled graph keeps what it traced);
- for a scope by ``with prefer_reference():``, or for one call by an op function's ``fast=False``;
- for fla's kernels alone by ``INFINITEVL_DISABLE_FLA=1``.

Ops whose checks depend only on cheap facts (device type, grad mode) pass ``key=``: their decisions are
cached by those facts, so the per-call cost on the decode hot path is a dict lookup. Inside a graph being
compiled nothing is cached or logged (the choice is part of the traced graph).

``cuda_inference_op`` builds the elementwise ops (norms, gates, rotary): a Triton kernel of the package for CUDA
inference (`triton_elementwise.py`), a ``torch.compile``d implementation where that kernel does not serve, the
function itself otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Callable, NamedTuple

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)

TORCH_OPS_ENV = "INFINITEVL_TORCH_OPS"
DISABLE_ENV = "INFINITEVL_DISABLE_FLA"
TORCH, FLA = "torch", "fla"

FitCheck = Callable[..., "str | None"]


class Implementation(NamedTuple):
    name: str
    fn: Callable
    fits: FitCheck | None  # None: serves every call (the reference)


# os.environ's own store where it keeps one (POSIX: bytes keys): the switches are read on every op call at
# decode, and `os.environ.get` encodes the key and goes through two wrappers first. It holds what os.environ
# holds (monkeypatch.setenv and os.environ[...] = ... update it).
_ENVIRON = getattr(os.environ, "_data", None) if os.name == "posix" else None
_ENVIRON = _ENVIRON if isinstance(_ENVIRON, dict) else None
_ENV_KEYS = {}


def _env(name: str) -> str | None:
    """os.environ.get(name), cheaper."""
    if _ENVIRON is None:
        return os.environ.get(name)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = os.fsencode(name)
    value = _ENVIRON.get(key)
    return None if value is None else os.fsdecode(value)


def _env_on(name: str) -> bool:
    value = _env(name)
    return value is not None and value.strip().lower() in ("1", "true", "yes", "on")


def torch_ops_forced() -> bool:
    """True when ``INFINITEVL_TORCH_OPS`` is 1/true/yes/on (read at call time)."""
    return _env_on(TORCH_OPS_ENV)


def fla_disabled() -> bool:
    """True when ``INFINITEVL_DISABLE_FLA`` is 1/true/yes/on (read at call time)."""
    return _env_on(DISABLE_ENV)


_reference_scopes = 0


@contextlib.contextmanager
def prefer_reference():
    """Run every op on its torch reference inside the block (kernel-vs-reference comparisons)."""
    global _reference_scopes
    _reference_scopes += 1
    try:
        yield
    finally:
        _reference_scopes -= 1


def reference_forced() -> str | None:
    """Why every op runs its torch reference now (`prefer_reference()` or INFINITEVL_TORCH_OPS), or None; for
    choices made outside an `Op` (the long-chunk attention path)."""
    return _forced_reason(False)


def _forced_reason(reference: bool) -> str | None:
    if reference or _reference_scopes:
        return "the torch reference was asked for"
    if torch_ops_forced():
        return f"{TORCH_OPS_ENV} is set"
    return None


class Op:
    """One op's implementations in order of preference, the reference last. Call it like the reference."""

    def __init__(self, name: str, reference: Callable, key: Callable[..., tuple] | None = None):
        self.name = name
        self.implementations: list[Implementation] = [Implementation(TORCH, reference, None)]
        self.key = key
        self._decisions: dict = {}
        functools.update_wrapper(self, reference)

    def register(self, name: str, fn: Callable, fits: FitCheck) -> None:
        """Add `fn` after the implementations registered before it, ahead of the reference."""
        self.implementations.insert(len(self.implementations) - 1, Implementation(name, fn, fits))
        self._decisions.clear()

    def decide(self, *args, reference: bool = False, **kwargs) -> tuple[Implementation, str | None]:
        """The implementation for this call and the reason the preferred one was skipped (None: it fits)."""
        forced = _forced_reason(reference)
        if forced is not None:
            return self.implementations[-1], forced
        skipped = None
        for impl in self.implementations[:-1]:
            reason = impl.fits(*args, **kwargs)
            if reason is None:
                return impl, skipped
            if skipped is None:  # the preferred one's reason; with several kernels, named
                skipped = reason if len(self.implementations) == 2 else f"{impl.name}: {reason}"
        return self.implementations[-1], skipped

    def select(self, *args, reference: bool = False, **kwargs) -> Implementation:
        """`decide`, logged once per (implementation, reason); cached by `key` where the op has one."""
        if torch.compiler.is_compiling():
            return self.decide(*args, reference=reference, **kwargs)[0]
        cache_key = None
        if self.key is not None:
            cache_key = (reference, _reference_scopes, _env(TORCH_OPS_ENV), self.key(*args, **kwargs))
            impl = self._decisions.get(cache_key)
            if impl is not None:
                return impl
        impl, reason = self.decide(*args, reference=reference, **kwargs)
        _log_once(self.name, impl.name, reason)
        if cache_key is not None:
            self._decisions[cache_key] = impl
        return impl

    def __call__(self, *args, reference: bool = False, **kwargs):
        return self.select(*args, reference=reference, **kwargs).fn(*args, **kwargs)


_OPS: dict[str, Op] = {}
_LOGGED: set[tuple[str, str, str | None]] = set()


def _log_once(op_name: str, impl_name: str, reason: str | None) -> None:
    key = (op_name, impl_name, reason)
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.info(f"{op_name}: using {impl_name}" + ("" if reason is None else f" ({reason})") + ".")


def register_op(name: str, reference: Callable, key: Callable[..., tuple] | None = None) -> Op:
    """The op `name` with `reference` as its torch implementation (its other implementations register on it)."""
    if name in _OPS:
        raise ValueError(f"the op {name!r} is registered already")
    _OPS[name] = created = Op(name, reference, key)
    return created


def op(name: str) -> Op:
    return _OPS[name]


def decide(name: str, *args, **kwargs) -> tuple[str, str | None]:
    """(implementation name, reason the preferred one was skipped) for one call of op `name`; not logged."""
    impl, reason = _OPS[name].decide(*args, **kwargs)
    return impl.name, reason


def select(name: str, *args, **kwargs) -> str:
    """The name of the implementation op `name` runs for these arguments (logged once)."""
    return _OPS[name].select(*args, **kwargs).name


# ---- availability facts shared by the implementations -------------------------------------------------------


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether Triton imports here (the Triton kernels and `torch.compile`'s CUDA code need it). Asked once."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# torch.cuda.current_device() without its initialisation check, which costs more than the answer (the module path
# asks about 300 times a decode step, each time with a CUDA tensor in hand: CUDA is initialised). None on builds
# without CUDA, where torch.cuda.current_device() answers (it raises, unless a test stands in for it).
_FAST_CURRENT_DEVICE = getattr(torch._C, "_cuda_getDevice", None)


def current_cuda_device() -> int:
    """The index of the current CUDA device (for callers that hold a CUDA tensor)."""
    fast = _FAST_CURRENT_DEVICE
    return fast() if fast is not None else torch.cuda.current_device()


def off_current_device(device: torch.device) -> str | None:
    """"cuda:1, not on the current device cuda:0" for a CUDA `device` other than the current one, else None (an
    unindexed "cuda" is the current one). Triton kernels and CUDA graph captures run on the current device."""
    if device.index is None:
        return None
    current = current_cuda_device()
    return None if device.index == current else f"{device}, not on the current device cuda:{current}"


def current_device_problem(tensor: torch.Tensor) -> str | None:
    """Why a package Triton kernel cannot launch for the CUDA tensor `tensor` now, or None: Triton launches on the
    current device and its stream, so a tensor on another device (a model placed on cuda:1) is left to torch's ops,
    which follow their tensors. Not asked inside a graph being compiled (its own device guards hold)."""
    if torch.compiler.is_compiling():
        return None
    where = off_current_device(tensor.device)
    return None if where is None else f"inputs are on {where} that Triton launches on"


def cuda_here_problem(tensor: torch.Tensor) -> str | None:
    """Why a package Triton kernel cannot launch on `tensor` where it lives, or None: it is not on CUDA, or on
    another CUDA device than the current one (`current_device_problem`)."""
    if not tensor.is_cuda:
        return "inputs are not on CUDA"
    return current_device_problem(tensor)


def one_token_kernel_problem(first: torch.Tensor, *tensors) -> str | None:
    """Why a package Triton kernel without a backward cannot take a call on `first` (and `tensors`, None
    ignored), or None: CUDA tensors on the current device, no gradients needed, not inside a graph being compiled."""
    if not first.is_cuda:
        return "inputs are not on CUDA"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (first, *tensors)):
        return "gradients needed (the kernel has no backward)"
    if torch.compiler.is_compiling():
        return "inside a graph being compiled"
    return current_device_problem(first)


def not_all_cuda(*tensors) -> str | None:
    """Why tensors (None ignored) do not all sit on CUDA, or None."""
    present = [t for t in tensors if t is not None]
    if not present or not all(t.is_cuda for t in present):
        return "inputs are not all on CUDA"
    return None


# op name -> loader returning (kernels or None, reason fla is unavailable or None)
_FLA_LOADERS: dict[str, Callable[[], tuple[object | None, str | None]]] = {}


def register_fla_loader(op_name: str, loader: Callable[[], tuple[object | None, str | None]]) -> None:
    """The lazy import of fla's kernel for `op_name` (its ``cuda.py``), asked by `fla_problem`."""
    _FLA_LOADERS[op_name] = loader


def fla_problem(op_name: str, *tensors) -> str | None:
    """Why fla's kernel of `op_name` cannot serve a call on `tensors` (None ignored), or None."""
    not_cuda = not_all_cuda(*tensors)
    if not_cuda is not None:
        return not_cuda
    if fla_disabled():
        return f"{DISABLE_ENV} is set"
    loader = _FLA_LOADERS.get(op_name)
    if loader is None:
        return "no fla kernel is registered for this op"
    kernels, reason = loader()
    if kernels is None:
        return f"fla is unavailable ({reason})"
    present = [t for t in tensors if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return fla_backward_problem(present[0].device)
    return None


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


# ---- compiled for CUDA inference: the elementwise ops' fallback where the package's kernel does not fit ------


def cuda_inference_problem(first, *args) -> str | None:
    """Why a compiled elementwise kernel cannot serve a call whose first argument is `first`, or None."""
    if torch.is_grad_enabled():
        return "autograd is on"
    if not first.is_cuda:
        return "inputs are not on CUDA"
    if torch.compiler.is_compiling():
        return "inside a graph being compiled"
    return None


def _cuda_inference_key(first, *args) -> tuple:
    return first.device.type, torch.is_grad_enabled()


def compile_lazily(fn: Callable) -> Callable:
    """`fn` through `torch.compile`, compiled on first use (`cuda_inference_problem` says when it may run).

    Every dim but the last of each tensor argument (tokens, batch, heads) is compiled as a variable, so one
    kernel serves every call length; the last (feature) dim stays a constant, which lets the compiler vectorise
    the loads. (`dynamic=True` would make it a variable too, and the kernels ran at half the bandwidth.)"""
    compiled = None

    @functools.wraps(fn)
    def run(*args):
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn, dynamic=False)
        for arg in args:
            if isinstance(arg, torch.Tensor):
                for dim in range(arg.dim() - 1):
                    torch._dynamo.maybe_mark_dynamic(arg, dim)
        return compiled(*args)

    return run


def cuda_inference_op(fn: Callable, name: str | None = None) -> Op:
    """An elementwise op for CUDA inference (autograd off, not inside a caller's compiled graph): the package's
    Triton kernel of `name` where there is one and Triton imports (`triton_elementwise.KERNELS`), then `fn`
    compiled; `fn` itself otherwise. Arguments are positional. Registered as `name` when given (the package's
    ops); without one it is an op of the caller's own (a benchmark's, a test's)."""
    kernel = problem = problem_key = None
    if name is not None and triton_available():
        from .triton_elementwise import KERNELS, problem_for, problem_key

        kernel, problem = KERNELS.get(name), problem_for(name)
    key = problem_key if kernel is not None else _cuda_inference_key
    created = register_op(name, fn, key=key) if name else Op(fn.__name__, fn, key)
    if kernel is not None:
        created.register("triton", kernel, problem)
    created.register("compiled", compile_lazily(fn), cuda_inference_problem)
    return created
