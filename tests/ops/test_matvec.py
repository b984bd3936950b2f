"""ops.matvec: F.linear on CPU; the Triton kernel on CUDA matches cuBLAS."""

import pytest
import torch
import torch.nn.functional as F

from infinitevl_hf.modeling.ops.matvec import matvec, matvec_available


def test_matvec_is_linear_off_cuda():
    x, w, b = torch.randn(1, 40), torch.randn(7, 40), torch.randn(7)
    torch.testing.assert_close(matvec(x, w, b), F.linear(x, w, b))
    rows = torch.randn(3, 40)  # several rows: F.linear (off CUDA, as here; cuBLAS's product on CUDA)
    torch.testing.assert_close(matvec(rows, w), F.linear(rows, w))


@pytest.mark.skipif(not matvec_available(), reason="needs Triton")
def test_the_sum_before_a_norm_needs_a_tensor_of_its_own():
    """Every program of the add+norm prologue reads x and x_delta while the first writes their sum: the sum's
    tensor must be shaped like x and be neither of them (checked before anything launches)."""
    from infinitevl_hf.modeling.ops.matvec.triton_matvec import fused_matvec

    x, delta, w, nw = torch.randn(1, 8), torch.randn(1, 8), torch.randn(4, 8), torch.ones(8)
    for x_sum in (x, delta, torch.empty(1, 4), torch.empty(8, 2).t()[:1]):
        with pytest.raises(ValueError, match="x_sum must be"):
            fused_matvec(x, w, norm_weight=nw, eps=1e-6, x_delta=delta, x_sum=x_sum)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,k", [(12320, 2048), (2048, 11008), (2560, 2048), (7, 40), (1000, 1000)])
def test_triton_matvec_matches_cublas(n, k):
    assert matvec_available()
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    expected = F.linear(x, w, b).float()
    got = matvec(x, w, b).float()
    assert ((got - expected).norm() / expected.norm()).item() < 1e-2
