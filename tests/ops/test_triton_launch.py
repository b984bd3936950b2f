"""`triton_launch.launch`: Triton's own launch once per signature, the compiled kernel's launcher after that.

A fake kernel stands in for a `triton.jit` function (the direct launch needs a GPU), recording which path
each call took and what it was handed."""

from __future__ import annotations

import types

import pytest
import torch

triton = pytest.importorskip("triton")

from infinitevl_hf.modeling.ops import triton_launch  # noqa: E402


class FakeCompiled:
    """A compiled kernel's launcher as `JITFunction.run` calls it: grid, stream, function, metadata, hooks, args."""

    function, packed_metadata = "function", "packed"

    def __init__(self):
        self.direct = []
        self.metadata_asked = 0

    def launch_metadata(self, grid, stream, *args):
        self.metadata_asked += 1
        return ("metadata", grid, stream)

    def run(self, g0, g1, g2, stream, function, packed, metadata, enter_hook, exit_hook, *args):
        assert (stream, function, packed) == ("stream 0", "function", "packed")
        self.direct.append(((g0, g1, g2), args))
        self.hooks = (metadata, enter_hook, exit_hook)


class FakeKernel:
    """Parameters X, Y, n, eps, BLOCK (constexpr), FLAG (constexpr, default False)."""

    def __init__(self, returns=True):
        names = [("X", None), ("Y", None), ("n", None), ("eps", None), ("BLOCK", None), ("FLAG", False)]
        self.params = [types.SimpleNamespace(name=name, default=default) for name, default in names]
        self.pre_run_hooks = []
        self.compiled = FakeCompiled() if returns else None
        self.bound = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.bound.append((grid, args, kwargs))
            return self.compiled

        return run


@pytest.fixture
def direct(monkeypatch):
    monkeypatch.setattr(triton_launch, "_DIRECT", True)
    monkeypatch.setattr(triton_launch, "_current_device", lambda: 0)
    monkeypatch.setattr(triton_launch, "driver", types.SimpleNamespace(
        active=types.SimpleNamespace(get_current_stream=lambda device: f"stream {device}")))
    monkeypatch.setattr(triton_launch, "_signatures", {})
    monkeypatch.setattr(triton_launch, "_stream_getter", None)


def call(kernel, x, n=64, grid=(3,), **kwargs):
    y = torch.empty_like(x)
    triton_launch.launch(kernel, grid, x, y, n, 1e-6, BLOCK=64, num_warps=4, **kwargs)
    return y


def test_the_second_call_of_a_signature_launches_the_compiled_kernel_with_every_parameter_in_order(direct):
    kernel = FakeKernel()
    call(kernel, torch.zeros(8))
    assert len(kernel.bound) == 1 and kernel.compiled.direct == []
    x = torch.zeros(8)
    y = call(kernel, x, grid=(5, 2))
    assert len(kernel.bound) == 1, "the same signature was bound again"
    (grid, args), = kernel.compiled.direct
    assert grid == (5, 2, 1)
    assert args[0] is x and args[1] is y and args[2:] == (64, 1e-6, 64, False)  # BLOCK passed, FLAG its default


@pytest.mark.parametrize("change", ["int", "dtype", "alignment", "bool for int", "constexpr", "constexpr type",
                                    "option"])
def test_a_call_that_specialises_differently_takes_tritons_launch(direct, change):
    kernel = FakeKernel()
    base = torch.zeros(16, dtype=torch.float16)
    call(kernel, base)
    if change == "int":
        call(kernel, base, n=65)
    elif change == "dtype":
        call(kernel, base.float())
    elif change == "alignment":
        call(kernel, base[1:])  # 2 bytes past a 16-byte boundary
    elif change == "bool for int":  # True == 1, but Triton types them apart
        call(kernel, base, n=1)
        call(kernel, base, n=True)
    elif change == "constexpr":
        call(kernel, base, FLAG=True)
    elif change == "constexpr type":  # FLAG=1 == True, but Triton compiles them apart
        call(kernel, base, FLAG=True)
        call(kernel, base, FLAG=1)
    else:
        y = torch.empty_like(base)
        triton_launch.launch(kernel, (3,), base, y, 64, 1e-6, BLOCK=64, num_warps=8)
    assert len(kernel.bound) == (3 if change in ("bool for int", "constexpr type") else 2)
    assert kernel.compiled.direct == []


def test_floats_are_one_signature_whatever_their_value(direct):
    kernel = FakeKernel()
    x = torch.zeros(8)
    triton_launch.launch(kernel, (1,), x, x, 8, 1e-6, BLOCK=8)
    triton_launch.launch(kernel, (1,), x, x, 8, 1e-5, BLOCK=8)
    assert len(kernel.bound) == 1 and kernel.compiled.direct[0][1][3] == 1e-5


@pytest.mark.parametrize("case", ["compiling", "callable grid", "pre-run hook", "interpreter", "tensor keyword", "off"])
def test_tritons_launch_serves_what_the_direct_one_cannot(direct, monkeypatch, case):
    kernel = FakeKernel(returns=case != "interpreter")
    x = torch.zeros(8)
    grid = (1,)
    kwargs = {}
    if case == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    elif case == "callable grid":
        grid = lambda meta: (1,)  # noqa: E731
    elif case == "pre-run hook":
        kernel.pre_run_hooks.append(lambda *a, **k: None)
    elif case == "tensor keyword":
        kwargs = {"FLAG": torch.ones(1)}
    elif case == "off":
        monkeypatch.setattr(triton_launch, "_DIRECT", False)
    for _ in range(3):
        triton_launch.launch(kernel, grid, x, x, 8, 1e-6, BLOCK=8, **kwargs)
    assert len(kernel.bound) == 3
    assert kernel.compiled is None or kernel.compiled.direct == []


def test_signatures_per_kernel_are_bounded(direct, monkeypatch):
    monkeypatch.setattr(triton_launch, "MAX_SIGNATURES", 4)
    kernel = FakeKernel()
    x = torch.zeros(8)
    for n in range(10):
        triton_launch.launch(kernel, (1,), x, x, n, 1e-6, BLOCK=8)
    assert len(triton_launch._signatures[kernel]) <= 4
    triton_launch.launch(kernel, (1,), x, x, 9, 1e-6, BLOCK=8)  # the newest is still known
    assert len(kernel.bound) == 10 and len(kernel.compiled.direct) == 1


def test_the_host_side_grid_helpers_match_tritons():
    for n in (1, 2, 3, 7, 8, 9, 1000, 1024, 1025):
        assert triton_launch.next_power_of_2(n) == triton.next_power_of_2(n)
        for d in (1, 3, 16):
            assert triton_launch.cdiv(n, d) == triton.cdiv(n, d)


def test_the_direct_launch_is_limited_to_the_releases_read_and_compiled_code(monkeypatch):
    assert triton_launch._release("3.6.0") == (3, 6)
    assert triton_launch._release("3.10.0+git1234") == (3, 10)
    assert triton_launch._release("3.7rc1") == (3, 7)
    monkeypatch.setattr(triton_launch.triton, "__version__", "3.6.0")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert triton_launch.direct_launch_available()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not triton_launch.direct_launch_available()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("INFINITEVL_DIRECT_LAUNCH", "0")
    assert not triton_launch.direct_launch_available()
    monkeypatch.delenv("INFINITEVL_DIRECT_LAUNCH")
    assert triton_launch.direct_launch_available()
    for version in ("3.5.1", "3.10.0", "4.0.0"):
        monkeypatch.setattr(triton_launch.triton, "__version__", version)
        assert not triton_launch.direct_launch_available(), version


def test_launch_metadata_is_built_only_for_a_launch_hook(direct, monkeypatch):
    """Profilers set Triton's launch hooks; they get the metadata. Without one nothing builds it."""
    kernel = FakeKernel()
    x = torch.zeros(8)
    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", None)
    for _ in range(2):
        call(kernel, x)
    assert kernel.compiled.metadata_asked == 0 and kernel.compiled.hooks[:2] == (None, None)
    enter = lambda metadata: None  # noqa: E731
    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", enter)
    call(kernel, x, grid=(2,))
    assert kernel.compiled.metadata_asked == 1
    assert kernel.compiled.hooks[:2] == (("metadata", (2, 1, 1), "stream 0"), enter)


def test_empty_hook_chains_count_as_no_hook(direct, monkeypatch):
    """Newer Triton keeps each launch hook as a chain of hooks, empty unless a profiler adds one: an empty chain
    builds no metadata and is not handed to the launcher; a chain with a hook in it is."""
    chain_type = getattr(getattr(triton, "knobs", None), "HookChain", None)
    if chain_type is None:
        pytest.skip(f"Triton {triton.__version__} keeps its launch hooks as plain callables")
    kernel = FakeKernel()
    x = torch.zeros(8)
    enter, leave = chain_type(), chain_type(reversed=True)
    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", enter)
    monkeypatch.setattr(triton.knobs.runtime, "launch_exit_hook", leave)
    for _ in range(2):
        call(kernel, x)
    assert kernel.compiled.metadata_asked == 0 and kernel.compiled.hooks == (None, None, None)
    leave.add(lambda metadata: None)
    call(kernel, x, grid=(2,))
    assert kernel.compiled.metadata_asked == 1
    assert kernel.compiled.hooks == (("metadata", (2, 1, 1), "stream 0"), enter, leave)


def test_a_prepared_launch_is_the_launch_with_its_keywords(direct):
    """`Launch(kernel, **kwargs)(grid, *args)` takes the paths `launch(kernel, grid, *args, **kwargs)` takes: bound
    once per signature, direct after that, and its keywords are part of the signature."""
    kernel = FakeKernel()
    x = torch.zeros(8)
    plain, flagged = triton_launch.Launch(kernel, BLOCK=8), triton_launch.Launch(kernel, BLOCK=8, FLAG=True)
    plain((1,), x, x, 8, 1e-6)
    plain((2,), x, x, 8, 1e-6)
    assert len(kernel.bound) == 1 and kernel.compiled.direct[0][1][2:] == (8, 1e-6, 8, False)
    flagged((1,), x, x, 8, 1e-6)  # other constexprs: bound anew
    flagged((1,), x, x, 8, 1e-6)
    assert len(kernel.bound) == 2 and kernel.compiled.direct[1][1][2:] == (8, 1e-6, 8, True)
    triton_launch.launch(kernel, (1,), x, x, 8, 1e-6, BLOCK=8, FLAG=True)  # the same signature as `flagged`'s
    assert len(kernel.bound) == 2 and len(kernel.compiled.direct) == 3


def test_keyword_tokens_are_never_reused(direct, monkeypatch):
    """A `Launch` keeps its token after the tokens are cleared: a new set of keywords never gets that token."""
    monkeypatch.setattr(triton_launch, "_KEYWORDS", {})
    kernel = FakeKernel()
    x = torch.zeros(8)
    kept = triton_launch.Launch(kernel, BLOCK=8)
    kept((1,), x, x, 8, 1e-6)
    triton_launch._KEYWORDS.clear()
    other = triton_launch.Launch(kernel, BLOCK=16)
    assert other.keywords != kept.keywords
    other((1,), x, x, 8, 1e-6)
    assert len(kernel.bound) == 2 and kernel.bound[1][2] == {"BLOCK": 16}


def test_a_tensor_keyword_gets_a_token_of_its_own_not_kept(direct, monkeypatch):
    monkeypatch.setattr(triton_launch, "_KEYWORDS", {})
    flag = torch.ones(1)
    first, second = triton_launch._keywords_token({"FLAG": flag}), triton_launch._keywords_token({"FLAG": flag})
    assert first != second and triton_launch._KEYWORDS == {}
