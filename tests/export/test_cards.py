"""Model cards render from the packaged templates, parse with huggingface_hub, and carry the required metadata."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

from helpers import tiny_config
from infinitevl_hf.cards import TEMPLATES, render_model_card, write_model_card


@pytest.mark.parametrize("kind", sorted(TEMPLATES))
def test_cards_parse_with_required_metadata(kind):
    info = {"base_model": "Qwen/Qwen2.5-VL-3B-Instruct"} if kind == "converted" else {}
    card = ModelCard(str(render_model_card(kind, config=tiny_config(), **info)))
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "image-text-to-text"
    assert data["license"] == "apache-2.0"
    assert "infinitevl" in data["tags"]
    assert "2512.08829" in card.content and "@article{tao2025infinitevl" in card.content
    assert "{{" not in card.content


def test_released_cards_name_their_base_models():
    assert render_model_card("infinitevl-4b").data.base_model == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert render_model_card("infinitevl-4b-longsft").data.base_model == "hustvl/InfiniteVL"
    assert "trust_remote_code=True" in render_model_card("infinitevl-4b").content


def test_bad_kind_is_named():
    with pytest.raises(ValueError, match="Unknown model card kind"):
        render_model_card("nope")


def test_missing_base_model_is_named():
    with pytest.raises(ValueError, match="base_model"):
        render_model_card("converted")


def test_write_keeps_an_existing_card(tmp_path):
    path = write_model_card(tmp_path, "infinitevl-4b")
    assert ModelCard.load(path).data.pipeline_tag == "image-text-to-text"
    path.write_text("mine")
    assert write_model_card(tmp_path, "infinitevl-4b").read_text() == "mine"
