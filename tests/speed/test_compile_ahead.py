"""`speed.compile_ahead`: a pass over a call whose first Triton launches become compile jobs on worker threads.

Triton needs a GPU to compile, so these tests drive the hook as Triton calls it (the keyword arguments of
`JITFunction._call_hook`) with stand-in kernels; tests/gpu/test_gpu_generate.py runs it on real kernels."""

import threading
from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip("triton")
from triton import knobs  # noqa: E402

from infinitevl_hf.speed import compile_ahead as ahead  # noqa: E402


class FakeKernel:
    def __init__(self, name):
        self.name = name


def _first_launch(kernel, key="k0", warmup=False):
    """What Triton's `JITFunction.run` does on a cache miss: ask the hook; True means "do not compile or launch"."""
    hook = knobs.runtime.jit_cache_hook
    info = SimpleNamespace(module="m", name=kernel.name, jit_function=kernel)
    skipped = hook(key=key, repr=f"{kernel.name}[{key}]", fn=info,
                   compile={"key": key, "specialization_data": f"{kernel.name}/{key}"},
                   is_manual_warmup=warmup, already_compiled=False) if hook else None
    return bool(skipped)


@pytest.fixture
def compiled(monkeypatch):
    """The jobs the pool ran, (kernel name, specialization data, device), in place of Triton's compiler."""
    done, lock = [], threading.Lock()

    def fake_compile(jit_function, specialization_data, device):
        if jit_function.name == "broken":
            raise RuntimeError("does not compile")
        with lock:
            done.append((jit_function.name, specialization_data, device))
        return jit_function.name != "declined"  # another hook declined it: preload gave no kernel

    monkeypatch.setattr(ahead, "_compile", fake_compile)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.delenv(ahead.SWITCH_ENV, raising=False)
    return done


def test_first_launches_are_skipped_and_compiled_once_each_on_the_pool(compiled):
    a, b = FakeKernel("a"), FakeKernel("b")
    skipped = []

    def run():
        skipped.extend([_first_launch(a), _first_launch(b), _first_launch(a), _first_launch(a, key="k1")])

    assert ahead.compile_ahead(run, workers=2) == 3
    assert skipped == [True, True, True, True]
    assert sorted(compiled) == [("a", "a/k0", 3), ("a", "a/k1", 3), ("b", "b/k0", 3)]


def test_the_hook_is_put_back_and_chained_for_everything_else(compiled):
    seen = []

    def previous(**kwargs):
        seen.append((kwargs["fn"].name, kwargs["is_manual_warmup"]))
        return None

    knobs.runtime.jit_cache_hook = previous
    try:
        results = {}

        def other_thread():
            results["other"] = _first_launch(FakeKernel("elsewhere"))

        def run():
            results["warmup"] = _first_launch(FakeKernel("warmed"), warmup=True)  # an explicit warmup compiles itself
            thread = threading.Thread(target=other_thread)
            thread.start()
            thread.join()

        assert ahead.compile_ahead(run) == 0
        assert results == {"warmup": False, "other": False}  # neither skipped: both launch as usual
        assert seen == [("warmed", True), ("elsewhere", False)]
        assert compiled == []
        assert knobs.runtime.jit_cache_hook is previous
    finally:
        knobs.runtime.jit_cache_hook = None


def test_an_autotuners_timing_runs_launch(compiled):
    """Skipping them would time empty launches and keep a random config."""
    namespace = {"first_launch": _first_launch, "kernel": FakeKernel("tuned")}
    exec(compile("def _bench():\n    return first_launch(kernel)\n", "/somewhere/triton/runtime/autotuner.py", "exec"),
         namespace)
    results = []
    assert ahead.compile_ahead(lambda: results.append(namespace["_bench"]())) == 0
    assert results == [False]
    assert ahead._in_autotuner_timing(None) is False


def test_failed_or_declined_compiles_are_not_counted_and_a_pass_that_raises_is_not_finished(compiled):
    def run():
        for name in ("broken", "declined", "fine"):
            _first_launch(FakeKernel(name))

    assert ahead.compile_ahead(run) == 1  # the broken kernel compiles (and raises) at its real launch

    def stops():
        _first_launch(FakeKernel("before the stop"))
        raise ValueError("a pass over garbage tripped")

    assert ahead.compile_ahead(stops) is None  # the caller keeps all its warm-ups
    assert sorted(name for name, _, _ in compiled) == ["before the stop", "declined", "fine"]  # still compiled
    assert knobs.runtime.jit_cache_hook is None


def test_switched_off_or_another_threads_pass_does_nothing_and_a_nested_pass_raises(compiled, monkeypatch):
    calls = []
    monkeypatch.setenv(ahead.SWITCH_ENV, "0")
    assert ahead.compile_ahead_problem() == f"{ahead.SWITCH_ENV}=0"
    assert ahead.compile_ahead(lambda: calls.append("ran")) is None
    assert calls == []  # the caller's own warm-up runs instead
    monkeypatch.delenv(ahead.SWITCH_ENV)
    assert ahead.compile_ahead_problem() is None

    def other_thread():
        calls.append(ahead.compile_ahead(lambda: calls.append("inner ran")))

    def outer():
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        with pytest.raises(RuntimeError, match="inside its own pass"):
            ahead.compile_ahead(lambda: calls.append("nested ran"))

    assert ahead.compile_ahead(outer) == 0
    assert calls == [None]


def test_a_hook_set_during_the_pass_is_left_in_place(compiled):
    def theirs(**kwargs):
        return None

    def run():
        knobs.runtime.jit_cache_hook = theirs  # e.g. another thread installs its own hook meanwhile

    try:
        assert ahead.compile_ahead(run) == 0
        assert knobs.runtime.jit_cache_hook is theirs
    finally:
        knobs.runtime.jit_cache_hook = None


def test_an_autotuner_whose_timing_runs_elsewhere_turns_it_off(compiled, monkeypatch):
    """The pass recognises timing runs by `Autotuner._bench`'s frame; a wrapper around it (a profiler's) keeps it."""
    import functools

    from triton.runtime.autotuner import Autotuner

    original = Autotuner._bench

    @functools.wraps(original)
    def timed(*args, **kwargs):
        return original(*args, **kwargs)

    monkeypatch.setattr(Autotuner, "_bench", timed)
    assert ahead.compile_ahead_problem() is None
    monkeypatch.setattr(Autotuner, "_bench", lambda *args, **kwargs: None)
    assert "Autotuner._bench" in ahead.compile_ahead_problem()
    assert ahead.compile_ahead(lambda: None) is None
