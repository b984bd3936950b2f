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
    tensor must be shaped like x and share no bytes with them (checked before anything launches)."""
    from infinitevl_hf.modeling.ops.matvec.triton_matvec import fused_matvec

    x, delta, w, nw = torch.randn(1, 8), torch.randn(1, 8), torch.randn(4, 8), torch.ones(8)
    for x_sum in (x, delta, torch.empty(1, 4), torch.empty(8, 2).t()[:1]):
        with pytest.raises(ValueError, match="x_sum must be"):
            fused_matvec(x, w, norm_weight=nw, eps=1e-6, x_delta=delta, x_sum=x_sum)
    both = torch.randn(1, 16)
    with pytest.raises(ValueError, match="x_sum must be"):  # its first address is not x's, but it meets x's bytes
        fused_matvec(both[:, :8], w, norm_weight=nw, eps=1e-6, x_delta=delta, x_sum=both[:, 4:12])


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 3])
def test_the_gated_output_norm_and_product_match_the_two_ops_at_the_4b_shape(rows):
    """A Gated DeltaNet's output of the released 4B model (16 heads of 256, into 2,048): the gated norm in the product's
    prologue (one row: one kernel) or the norm's kernel then cuBLAS (several rows), against the torch definition, with
    a gate sliced out of a wider projection row; every output written."""
    from infinitevl_hf.modeling.ops import dispatch
    from infinitevl_hf.modeling.ops.matvec import gated_rms_norm_matvec
    from infinitevl_hf.modeling.ops.matvec.reference import gated_rms_norm_matvec_reference

    torch.manual_seed(rows)
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    gate = torch.randn(rows, 12320, device="cuda", dtype=torch.bfloat16)[:, 8224:]
    norm_w = torch.rand(256, device="cuda", dtype=torch.bfloat16) + 0.5
    w = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    with torch.no_grad():
        implementation = dispatch.select("gated_rms_norm_matvec", x, gate, norm_w, 1e-6, w)
        got = gated_rms_norm_matvec(x, gate, norm_w, 1e-6, w)
        expected = gated_rms_norm_matvec_reference(x.double(), gate.double(), norm_w.double(), 1e-6, w.double())
    assert implementation == ("triton" if rows == 1 else "rows")
    assert torch.isfinite(got).all()
    assert ((got.double() - expected).norm() / expected.norm()).item() < 1e-2
