"""Quantized loading on CPU: torchao int8 weight-only and bitsandbytes 8-bit / 4-bit quantize the decoder's and the
vision tower's linear layers; Gated DeltaNet's decay parameters, convolutions and norms keep full precision.

Measured on the tiny fp32 checkpoint (relative logit error against the unquantized model, text / text + image):
torchao int8 7.1e-3 / 9.0e-3; bitsandbytes 8-bit 9.5e-3 / 1.0e-2, 4-bit nf4 1.1e-1 / 1.2e-1 (random weights, 4 bits).
Linear weights shrink to 27% of their fp32 bytes under torchao int8 (one byte per weight plus a scale and zero point
per row); bitsandbytes' memory footprint is 46% (8-bit) and 37% (nf4) of the fp32 model's, whose unquantized
embeddings are a large part of this tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from transformers import AutoProcessor, BitsAndBytesConfig, TorchAoConfig

import infinitevl_hf
from helpers import image_inputs, text_ids
from infinitevl_hf import InfiniteVLForConditionalGeneration, StreamingSession
from infinitevl_hf.speed.decode_step import DecodeStep

FULL_PRECISION = ("A_log", "dt_bias", "conv1d.weight", "norm.weight", "norm1.weight", "norm2.weight", "ln_q.weight")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return infinitevl_hf.tiny_checkpoint(tmp_path_factory.mktemp("quant") / "ckpt", sliding_window=8)


@pytest.fixture(scope="module")
def reference(checkpoint):
    return InfiniteVLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def torchao_int8(checkpoint):
    from torchao.quantization import Int8WeightOnlyConfig

    config = TorchAoConfig(Int8WeightOnlyConfig())
    return InfiniteVLForConditionalGeneration.from_pretrained(checkpoint, quantization_config=config, dtype=torch.float32).eval()


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


def _bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds, counting the inner tensors of a quantized tensor subclass."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def _image(model):
    """One image in text, with the tiny checkpoint's special-token ids and 14-pixel patches."""
    ids, pixels, grid = image_inputs(patch=14)
    config = model.config
    for helper_id, token_id in ((90, config.image_token_id), (92, config.vision_start_token_id), (93, config.vision_end_token_id)):
        ids = torch.where(ids == helper_id, token_id, ids)
    return {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": grid}


def test_torchao_int8_quantizes_linear_layers_only(torchao_int8):
    linears = {name for name, module in torchao_int8.named_modules() if isinstance(module, nn.Linear)}
    for name, param in torchao_int8.named_parameters(remove_duplicate=False):
        module, _, kind = name.rpartition(".")
        quantized = type(param.data).__name__ == "Int8Tensor"
        if name == "lm_head.weight":
            assert not quantized  # tied to the embeddings, which no quantizer converts
        elif module in linears and kind == "weight":
            assert quantized, name
        else:
            assert not quantized and param.dtype == torch.float32, name
    kept = [n for n, _ in torchao_int8.named_parameters() if n.endswith(FULL_PRECISION)]
    assert any("A_log" in n for n in kept) and any("q_conv1d" in n for n in kept) and any("visual" in n for n in kept)
    assert "model.visual.blocks.0.attn.qkv" in linears and "model.language_model.layers.1.self_attn.a_proj" in linears


def test_gated_deltanet_decay_stays_float32_in_a_float16_load(checkpoint, reference):
    assert {"A_log", "dt_bias"} <= set(InfiniteVLForConditionalGeneration._keep_in_fp32_modules)
    half = InfiniteVLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float16).eval()
    gdn = half.model.language_model.layers[1].self_attn
    assert gdn.A_log.dtype == gdn.dt_bias.dtype == torch.float32 and gdn.q_proj.weight.dtype == torch.float16
    ids = text_ids(1, 10)
    with torch.no_grad():
        assert _relative_error(half(input_ids=ids).logits.float(), reference(input_ids=ids).logits) < 1e-2


@pytest.mark.parametrize("with_image", [False, True])
def test_torchao_int8_logits_stay_close(reference, torchao_int8, with_image):
    inputs = _image(reference) if with_image else {"input_ids": text_ids(2, 12)}
    with torch.no_grad():
        error = _relative_error(torchao_int8(**inputs).logits, reference(**inputs).logits)
    assert error < 2e-2, error  # measured 7.1e-3 (text), 9.0e-3 (image)


def test_torchao_int8_generate_with_cache_equals_without(torchao_int8):
    ids = text_ids(1, 10)
    cached = torchao_int8.generate(ids, max_new_tokens=6, do_sample=False)
    uncached = torchao_int8.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (1, 16) and torch.equal(cached, uncached)


def test_torchao_int8_linear_weights_shrink_to_about_a_quarter(reference, torchao_int8):
    full = dict(reference.named_parameters())
    linear_full = linear_quantized = 0
    for name, param in torchao_int8.named_parameters():
        if type(param.data).__name__ == "Int8Tensor":
            linear_full += _bytes(full[name])
            linear_quantized += _bytes(param.data)
    assert 0.25 < linear_quantized / linear_full < 0.30
    total_full = sum(_bytes(p) for p in reference.parameters())
    total_quantized = sum(_bytes(p.data) for p in torchao_int8.parameters())
    assert total_quantized == total_full - (linear_full - linear_quantized)  # nothing else changed size


def test_fused_decode_step_declines_quantized_weights_with_a_reason(reference, torchao_int8):
    assert DecodeStep.unsupported(reference) is None
    assert "Int8Tensor (quantized" in DecodeStep.unsupported(torchao_int8)


def test_streaming_session_runs_on_torchao_int8(checkpoint, torchao_int8):
    processor = AutoProcessor.from_pretrained(checkpoint)
    session = StreamingSession(torchao_int8, processor)
    rng = np.random.default_rng(0)
    session.add_frames([rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for _ in range(4)])
    before = session.cache.nbytes
    answer = session.ask("What is in the video?", max_new_tokens=4)
    assert isinstance(answer, str) and session.cache.nbytes == before


@pytest.mark.parametrize(
    ("options", "module", "bound"),
    [({"load_in_8bit": True}, "Linear8bitLt", 3e-2), ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "Linear4bit", 2.5e-1)],
    ids=["8bit", "nf4"],
)
def test_bitsandbytes_on_cpu(checkpoint, reference, options, module, bound):
    config = BitsAndBytesConfig(**options)
    model = InfiniteVLForConditionalGeneration.from_pretrained(
        checkpoint, quantization_config=config, dtype=torch.float32, device_map="cpu"
    ).eval()
    gdn = model.model.language_model.layers[1].self_attn
    assert type(gdn.q_proj).__name__ == module and type(model.model.visual.blocks[0].attn.qkv).__name__ == module
    assert gdn.A_log.dtype == gdn.q_conv1d.weight.dtype == gdn.o_norm.weight.dtype == torch.float32
    ids = text_ids(2, 12)
    with torch.no_grad():
        error = _relative_error(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert error < bound, error  # measured 9.5e-3 (8-bit), 1.1e-1 (nf4)
    assert model.get_memory_footprint() < 0.5 * reference.get_memory_footprint()  # measured 46% (8-bit), 37% (nf4)
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (2, 15)
    assert DecodeStep.unsupported(model) is not None  # CUDA's fused decode falls back to the module path
