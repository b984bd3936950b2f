"""On CUDA, the functions compiled for inference (norms, SiLU gates, rotary embeddings) are as close to float32
as their eager bf16 versions, and one compiled graph serves every token count."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def rel(a, b):
    return ((a.float() - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def compiled_runs():
    """The compiled and eager bf16 outputs and the float32 ones at three lengths, and the graphs compiled meanwhile."""
    from torch._dynamo.utils import counters

    from infinitevl_hf.modeling.ops.dispatch import cuda_inference_op
    from infinitevl_hf.modeling.ops.elementwise import torch_apply_rotary as apply_rotary
    from infinitevl_hf.modeling.ops.norms import torch_gated_rms_norm as gated_rms_norm
    from infinitevl_hf.modeling.ops.norms import torch_rms_norm as rms_norm

    def norm_then_rotary(x, gate, weight, cos, sin):  # its own code object: a compile cache of its own
        q = gated_rms_norm(x, weight, gate, 1e-6)
        return apply_rotary(q, rms_norm(q, weight, 1e-6), cos, sin)

    run = cuda_inference_op(norm_then_rotary)
    weight = torch.randn(128, device="cuda")
    before = counters["stats"]["unique_graphs"]
    outputs = []
    with torch.no_grad():
        for length in (300, 517, 2064):
            x, gate = (torch.randn(2, 4, length, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            angles = torch.rand(2, length, 128, device="cuda") * 6.3
            cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
            exact = norm_then_rotary(x.float(), gate.float(), weight, cos.float(), sin.float())
            got, eager = run(x, gate, weight, cos, sin), norm_then_rotary(x, gate, weight, cos, sin)
            outputs.extend(zip(got, eager, exact))
    return outputs, counters["stats"]["unique_graphs"] - before


def test_compiled_outputs_have_the_eager_dtype_with_the_eager_shape(compiled_runs):
    outputs, _ = compiled_runs
    for g, e, x32 in outputs:
        assert g.dtype == e.dtype and g.shape == e.shape


def test_compiled_outputs_are_as_close_to_float32_as_eager(compiled_runs):
    outputs, _ = compiled_runs
    for g, e, x32 in outputs:
        # the compiled kernel rounds to bf16 once where eager rounds after every op
        assert rel(g, x32) <= 1.5 * rel(e, x32) + 1e-3, (rel(g, x32), rel(e, x32))


def test_one_compiled_graph_serves_every_length(compiled_runs):
    _, graphs = compiled_runs
    assert graphs == 1
