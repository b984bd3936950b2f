"""`modeling.projection.project`: the module path's products take the matvec op only for one row of a plain
nn.Linear in inference; everything else is the module's own call (hooks, subclasses, autograd, CPU)."""

import pytest
import torch
from torch import nn

from infinitevl_hf.modeling import projection


class _FakeCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA, to reach the kernel branch on a machine without a GPU."""

    @property
    def is_cuda(self):
        return True


@pytest.fixture
def matvec_calls(monkeypatch):
    calls = []

    def fake_matvec(x, weight, bias=None):
        calls.append((tuple(x.shape), weight))
        return torch.nn.functional.linear(x.as_subclass(torch.Tensor), weight, bias)

    monkeypatch.setattr(projection, "matvec", fake_matvec)
    return calls


def test_one_cuda_row_of_a_plain_linear_takes_the_matvec_op(matvec_calls):
    linear = nn.Linear(8, 5)
    x = torch.randn(1, 1, 8).as_subclass(_FakeCuda)
    with torch.no_grad():
        out = projection.project(linear, x)
    assert matvec_calls == [((1, 8), linear.weight)]
    assert out.shape == (1, 1, 5)
    torch.testing.assert_close(out.as_subclass(torch.Tensor), linear(x.as_subclass(torch.Tensor)))


def test_everything_else_calls_the_module(matvec_calls):
    linear = nn.Linear(8, 5)
    one_row = torch.randn(1, 1, 8).as_subclass(_FakeCuda)
    with torch.no_grad():
        projection.project(linear, torch.randn(1, 1, 8))  # CPU
        projection.project(linear, torch.randn(2, 1, 8).as_subclass(_FakeCuda))  # two rows
        with pytest.raises(RuntimeError, match="same dtype"):  # another dtype than the weight's: the module's error
            projection.project(linear, one_row.to(torch.float64))
        seen = []
        handle = linear.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        projection.project(linear, one_row)  # a hook must run
        handle.remove()
        assert seen == [(1, 1, 5)]

        class Subclass(nn.Linear):
            pass

        projection.project(Subclass(8, 5), one_row)
        replaced = nn.Linear(8, 5)
        replaced.forward = lambda x: torch.zeros(1, 1, 5)  # accelerate's hooks replace forward
        assert torch.equal(projection.project(replaced, one_row), torch.zeros(1, 1, 5))
    projection.project(linear, one_row)  # autograd on
    assert matvec_calls == []
