"""DecodeStep: the one-token decode as tensor functions equals the module path, eager and compiled."""

import pytest
import torch

from helpers import image_inputs, text_ids, tiny_model
from infinitevl_hf import InfiniteVLCache
from infinitevl_hf.modeling.compat import CACHE_KWARG
from infinitevl_hf.speed.decode_step import DecodeStep


def _prompted(model, **inputs) -> InfiniteVLCache:
    cache = InfiniteVLCache(model.config)
    with torch.no_grad():
        model(use_cache=True, **inputs, **{CACHE_KWARG: cache})
    return cache.to_static()


def _module_steps(model, cache, tokens):
    logits = []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            out = model(input_ids=tokens[:, t : t + 1], use_cache=True, **{CACHE_KWARG: cache})
            logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


def _decode_steps(model, cache, tokens, compile=False, concat=False):
    step = DecodeStep(model, cache, compile=compile, concat_projections=concat)
    return torch.cat([step(tokens[:, t : t + 1]) for t in range(tokens.shape[1])], 1)


def _assert_same_state(a: InfiniteVLCache, b: InfiniteVLCache, atol: float):
    assert a.seen_tokens == b.seen_tokens
    assert torch.equal(a.next_positions, b.next_positions) and torch.equal(a.device_step, b.device_step)
    for x, y in zip(a.layers, b.layers):
        if hasattr(x, "keys"):
            torch.testing.assert_close(x.keys, y.keys, atol=atol, rtol=0)
            assert torch.equal(x.valid, y.valid)
        else:
            for i in range(3):
                torch.testing.assert_close(x.conv_states[i], y.conv_states[i], atol=atol, rtol=0)
            torch.testing.assert_close(x.recurrent_states[0], y.recurrent_states[0], atol=atol, rtol=0)


@pytest.mark.parametrize("concat", [False, True], ids=["separate", "concat"])
@pytest.mark.parametrize("batch,prompt", [(1, 5), (2, 19)])  # 19 > window 8: the rings have wrapped
def test_decode_steps_equal_the_module_path(batch, prompt, concat):
    model = tiny_model()
    cache = _prompted(model, input_ids=text_ids(batch, prompt))
    reference_cache = cache.fork()
    tokens = text_ids(batch, 12, seed=5)
    expected = _module_steps(model, reference_cache, tokens)
    got = _decode_steps(model, cache, tokens, concat=concat)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)
    _assert_same_state(cache, reference_cache, atol=2e-5)


def test_decode_steps_continue_positions_after_an_image():
    model = tiny_model()
    ids, pixels, grid = image_inputs()
    cache = _prompted(model, input_ids=ids, pixel_values=pixels, image_grid_thw=grid)
    reference_cache = cache.fork()
    tokens = text_ids(1, 6, seed=7)
    torch.testing.assert_close(_decode_steps(model, cache, tokens), _module_steps(model, reference_cache, tokens), atol=2e-5, rtol=0)


def test_decode_step_needs_a_static_cache():
    model = tiny_model()
    cache = InfiniteVLCache(model.config)
    with torch.no_grad():
        model(input_ids=text_ids(1, 4), use_cache=True, **{CACHE_KWARG: cache})
    with pytest.raises(ValueError, match="static cache"):
        DecodeStep(model, cache)


@pytest.mark.slow
def test_compiled_decode_steps_equal_the_module_path():
    model = tiny_model()
    cache = _prompted(model, input_ids=text_ids(1, 11))
    reference_cache = cache.fork()
    tokens = text_ids(1, 4, seed=5)
    expected = _module_steps(model, reference_cache, tokens)
    got = _decode_steps(model, cache, tokens, compile=True, concat=True)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    _assert_same_state(cache, reference_cache, atol=1e-4)


def test_concatenated_projections_are_views_that_keep_the_weights():
    model = tiny_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    cache = _prompted(model, input_ids=text_ids(1, 6))
    DecodeStep(model, cache, concat_projections=True)
    mlp = model.model.language_model.layers[1].mlp
    assert mlp.gate_proj.weight.untyped_storage().data_ptr() == mlp.up_proj.weight.untyped_storage().data_ptr()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    # a second step over the same layout views the joined buffers instead of copying them again
    second = DecodeStep(model, cache.fork(), concat_projections=True)
    joined = second.layers[1].weights.gate_up
    assert joined.untyped_storage().data_ptr() == mlp.gate_proj.weight.untyped_storage().data_ptr()
    assert torch.equal(joined, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))


def test_decode_step_refuses_models_whose_modules_it_would_bypass():
    from torch import nn

    model = tiny_model()
    assert DecodeStep.unsupported(model) is None
    cache = _prompted(model, input_ids=text_ids(1, 6))

    class Wrapped(nn.Linear):  # stands for a LoRA/quantized layer whose forward differs from F.linear
        pass

    mlp = model.model.language_model.layers[1].mlp
    plain = mlp.up_proj
    mlp.up_proj = Wrapped(plain.in_features, plain.out_features, bias=False)
    assert "Wrapped" in DecodeStep.unsupported(model)
    with pytest.raises(ValueError, match="not a plain nn.Linear"):
        DecodeStep(model, cache)
    mlp.up_proj = plain
    model.model.language_model.layers[0]._hf_hook = object()  # what accelerate's device_map dispatch attaches
    assert "accelerate" in DecodeStep.unsupported(model)


def test_decode_step_refuses_lora_adapters():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj", "up_proj"])).base_model.model
    assert "LoRA" in DecodeStep.unsupported(model)


def test_decode_step_refuses_lora_on_the_lm_head():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["lm_head"])).base_model.model
    assert "lm_head" in DecodeStep.unsupported(model)


@pytest.mark.parametrize("override", [{"use_short_conv": False}, {"use_gate": False}])
def test_unsupported_names_gated_deltanet_variants_the_step_does_not_cover(override):
    # generate(static) on CUDA asks unsupported() before building the step: it must fall back, not raise
    model = tiny_model(**override)
    assert "Gated DeltaNet" in DecodeStep.unsupported(model)


def _joined_model_saved(tmp_path):
    """A model whose projections a fused step joined, saved directly through safetensors and through accelerate."""
    from accelerate import Accelerator
    from safetensors.torch import save_model

    model = tiny_model(tie_word_embeddings=False)
    DecodeStep(model, _prompted(model, input_ids=text_ids(1, 6)), concat_projections=True)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    save_model(model, str(tmp_path / "direct.safetensors"))  # refuses tensors that share a buffer
    Accelerator().save_model(model, str(tmp_path / "accelerate"))  # would drop all but one per buffer
    return model, expected


@pytest.mark.parametrize("saved_as", ["direct.safetensors", "accelerate/model.safetensors"], ids=["safetensors", "accelerate"])
def test_joined_weights_still_save(tmp_path, saved_as):
    from safetensors.torch import load_file

    _, expected = _joined_model_saved(tmp_path)
    saved = load_file(str(tmp_path / saved_as))
    assert saved.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(saved[key], value), key


def test_joined_weights_stay_views_of_the_joined_buffers_after_saving(tmp_path):
    model, _ = _joined_model_saved(tmp_path)
    # the live parameters are still views of the joined buffers
    mlp = model.model.language_model.layers[1].mlp
    assert mlp.gate_proj.weight.untyped_storage().data_ptr() == mlp.up_proj.weight.untyped_storage().data_ptr()
