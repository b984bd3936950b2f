"""What code written for any transformers model expects of this one: output flags (also from the config),
tuples with return_dict=False, the vision feature getters, inputs_embeds with images, loss keywords, and a
stateful model refusing assisted generation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPooling

from helpers import IMAGE_TOKEN, image_inputs, text_ids, tiny_model

SWA_LAYERS, GDN_LAYERS = (0, 4), (1, 2, 3)


def _attentions():
    model = tiny_model(attn_implementation="eager")
    ids = text_ids(2, 12)
    return model, model(ids, output_attentions=True).attentions


def test_output_attentions_gives_one_entry_per_layer():
    model, attentions = _attentions()
    assert len(attentions) == model.config.text_config.num_hidden_layers


def test_output_attentions_gives_none_for_gated_deltanet():
    _, attentions = _attentions()
    assert all(attentions[i] is None for i in GDN_LAYERS)


def test_output_attentions_gives_window_weights():
    _, attentions = _attentions()
    for i in SWA_LAYERS:
        weights = attentions[i]
        assert weights.shape == (2, 4, 12, 12)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 12))
        query, key = torch.arange(12)[:, None], torch.arange(12)[None, :]
        outside = (key > query) | (key <= query - 8)  # the future and what left the 8-token window
        assert bool((weights[..., outside] == 0).all()) and bool((weights[..., ~outside] > 0).all())


def test_generate_returns_the_attentions_of_every_step():
    model = tiny_model(attn_implementation="eager")
    ids = text_ids(1, 6)
    out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_attentions=True)
    assert len(out.attentions) == 3
    first, second = out.attentions[0], out.attentions[1]
    assert first[0].shape == (1, 4, 6, 6) and second[0].shape == (1, 4, 1, 7)
    assert all(step[i] is None for step in out.attentions for i in GDN_LAYERS)


def test_output_attentions_runs_a_long_prompt_in_one_piece():
    model = tiny_model(attn_implementation="eager", prefill_chunk_tokens=4)
    ids = text_ids(1, 12)
    chunked = model(ids).logits
    out = model(ids, output_attentions=True)
    assert out.attentions[0].shape == (1, 4, 12, 12)  # one call over the whole prompt, not chunks of 4
    torch.testing.assert_close(out.logits, chunked, rtol=1e-5, atol=1e-5)


def test_config_output_flags_apply_when_the_call_does_not_say():
    model = tiny_model(attn_implementation="eager")
    ids = text_ids(1, 5)
    model.config.output_hidden_states = True
    model.config.output_attentions = True
    out = model(ids)
    assert len(out.hidden_states) == 6 and out.attentions[0] is not None
    assert model(ids, output_hidden_states=False, output_attentions=False).hidden_states is None
    model.config.return_dict = False
    assert isinstance(model(ids), tuple)


def test_output_hidden_states_as_indices_returns_only_those():
    model = tiny_model()
    ids = text_ids(1, 5)
    every = model(ids, output_hidden_states=True).hidden_states
    some = model(ids, output_hidden_states=[0, -1]).hidden_states
    assert len(some) == len(every) == 6
    assert [h is not None for h in some] == [True, False, False, False, False, True]
    torch.testing.assert_close(some[0], every[0], rtol=0, atol=0)
    torch.testing.assert_close(some[-1], every[-1], rtol=0, atol=0)
    with pytest.raises(IndexError, match="out of range"):
        model(ids, output_hidden_states=[6])


def test_return_dict_false_gives_a_tuple():
    model = tiny_model()
    ids = text_ids(1, 5)
    labels = text_ids(1, 5, seed=3)
    as_dict = model(ids, labels=labels, use_cache=False)
    as_tuple = model(ids, labels=labels, use_cache=False, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    torch.testing.assert_close(as_tuple[1], as_dict.logits)
    assert isinstance(model.model(ids, return_dict=False), tuple)


def _two_images():
    ids, pixels, grid = image_inputs()
    return torch.cat([pixels, pixels.flip(0)]), torch.cat([grid, grid])


def test_get_image_features_takes_qwen_keywords_returning_a_pooling_output():
    model = tiny_model()
    pixels, grid = _two_images()
    out = model.get_image_features(pixel_values=pixels, image_grid_thw=grid)
    assert isinstance(out, BaseModelOutputWithPooling)


def test_get_image_features_returns_per_image_features():
    model = tiny_model()
    pixels, grid = _two_images()
    out = model.get_image_features(pixel_values=pixels, image_grid_thw=grid)
    assert len(out.pooler_output) == 2 and out.pooler_output[0].shape == (4, 32)
    torch.testing.assert_close(torch.cat(out.pooler_output), model.model.vision_features(pixels, grid))


def test_get_image_features_returns_every_hidden_state_on_request():
    model = tiny_model()
    pixels, grid = _two_images()
    deep = model.get_image_features(pixel_values=pixels, image_grid_thw=grid, output_hidden_states=True)
    assert len(deep.hidden_states) == model.config.vision_config.depth + 1


def test_get_image_features_returns_a_tuple_with_return_dict_false():
    model = tiny_model()
    pixels, grid = _two_images()
    assert isinstance(model.get_image_features(pixel_values=pixels, image_grid_thw=grid, return_dict=False), tuple)


def test_get_video_features_takes_qwen_keywords():
    model = tiny_model()
    pixels, grid = _two_images()
    video = model.get_video_features(pixel_values_videos=pixels, video_grid_thw=grid)
    image = model.get_image_features(pixel_values=pixels, image_grid_thw=grid)
    assert len(video.pooler_output) == 2
    for v, i in zip(video.pooler_output, image.pooler_output):
        torch.testing.assert_close(v, i)


def test_model_outputs_carry_the_vision_outputs():
    model = tiny_model()
    ids, pixels, grid = image_inputs()
    out = model(ids, pixel_values=pixels, image_grid_thw=grid)
    assert out.image_outputs is not None and out.video_outputs is None
    torch.testing.assert_close(out.image_outputs.pooler_output[0], model.model.vision_features(pixels, grid))


@pytest.mark.parametrize("marker", ["mm_token_type_ids", "embeddings"])
def test_inputs_embeds_with_images_without_input_ids_give_the_input_ids_logits(marker):
    model = tiny_model()
    ids, pixels, grid = image_inputs()
    expected = model(ids, pixel_values=pixels, image_grid_thw=grid).logits
    embeds = model.get_input_embeddings()(ids)
    extra = {"mm_token_type_ids": (ids == IMAGE_TOKEN).long()} if marker == "mm_token_type_ids" else {}
    got = model(inputs_embeds=embeds, pixel_values=pixels, image_grid_thw=grid, **extra).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_inputs_embeds_with_images_but_no_placeholders_is_refused_by_name():
    model = tiny_model()
    ids, pixels, grid = image_inputs()
    embeds = torch.randn(1, ids.shape[1], 32)
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        model(inputs_embeds=embeds, pixel_values=pixels, image_grid_thw=grid)


def test_generate_from_inputs_embeds_with_images_gives_the_input_ids_tokens():
    model = tiny_model()
    ids, pixels, grid = image_inputs()
    expected = model.generate(ids, pixel_values=pixels, image_grid_thw=grid, max_new_tokens=5, do_sample=False)
    got = model.generate(
        inputs_embeds=model.get_input_embeddings()(ids), pixel_values=pixels, image_grid_thw=grid,
        mm_token_type_ids=(ids == IMAGE_TOKEN).long(), max_new_tokens=5, do_sample=False,
    )
    assert torch.equal(got, expected[:, ids.shape[1]:])  # with embeddings, generate returns the new tokens only


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_from_inputs_embeds_beside_input_ids_gives_the_input_ids_tokens(num_beams):
    model = tiny_model()
    ids = text_ids(1, 9)
    expected = model.generate(ids, max_new_tokens=5, do_sample=False, num_beams=num_beams)
    got = model.generate(input_ids=ids, inputs_embeds=model.get_input_embeddings()(ids), max_new_tokens=5,
                         do_sample=False, num_beams=num_beams)
    assert torch.equal(got, expected)


def test_loss_takes_shift_labels_over_labels():
    model = tiny_model()
    ids = text_ids(2, 7)
    targets = text_ids(2, 7, seed=4)  # already shifted: position t predicts targets[:, t]
    targets[0, :2] = -100
    out = model(ids, labels=ids, shift_labels=targets, use_cache=False)
    expected = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    alone = model(ids, shift_labels=targets, use_cache=False).loss
    torch.testing.assert_close(alone, expected)


def test_loss_takes_num_items_in_batch():
    model = tiny_model()
    ids = text_ids(2, 7)
    out = model(ids, labels=ids, num_items_in_batch=5, use_cache=False)
    summed = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    torch.testing.assert_close(out.loss, summed / 5)


@pytest.mark.parametrize("assist", ["assistant_model", "prompt_lookup"])
def test_assisted_generation_is_refused_up_front(assist):
    model = tiny_model()
    assert model._is_stateful
    extra = {"assistant_model": tiny_model(seed=1)} if assist == "assistant_model" else {"prompt_lookup_num_tokens": 2}
    with pytest.raises(ValueError, match="stateful"):
        model.generate(text_ids(1, 6), max_new_tokens=3, do_sample=False, **extra)
