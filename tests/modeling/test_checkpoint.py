"""Parameter names and shapes of the official checkpoint; save/load round trips; loud failures."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

import infinitevl_hf
from helpers import image_inputs, text_ids, tiny_model
from infinitevl_hf import InfiniteVLConfig, InfiniteVLForConditionalGeneration
from infinitevl_hf.modeling.loading import LEGACY_KEY_MAPPING

DATA = Path(__file__).resolve().parents[1] / "data"


def _official_model_on_meta():
    config = InfiniteVLConfig(**json.loads((DATA / "official_config.json").read_text()))
    with torch.device("meta"):
        return InfiniteVLForConditionalGeneration(config)


def test_official_config_builds_the_official_state_dict_layout():
    model = _official_model_on_meta()
    ours = {name: list(p.shape) for name, p in model.state_dict().items()}
    official = {name: shape for name, shape, _ in json.loads((DATA / "official_state_dict_4b.json").read_text())}
    assert ours == official


def test_legacy_names_map_onto_ours():
    model = _official_model_on_meta()
    ours = {name: list(p.shape) for name, p in model.state_dict().items()}
    legacy = json.loads((DATA / "official_state_dict_4b_legacy_names.json").read_text())
    mapped = {}
    for name, shape, _ in legacy:
        for pattern, target in LEGACY_KEY_MAPPING.items():
            name = re.sub(pattern, target, name)
        mapped[name] = shape
    assert mapped == ours


def _logits(model):
    ids, pixel_values, grid = image_inputs()
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model and the folder it was saved to."""
    model = tiny_model()
    folder = tmp_path_factory.mktemp("saved")
    model.save_pretrained(folder)
    return model, folder


LOADERS = [AutoModelForImageTextToText, AutoModelForCausalLM, AutoModel, InfiniteVLForConditionalGeneration]


@pytest.mark.parametrize("auto", LOADERS, ids=lambda auto: auto.__name__)
def test_every_auto_class_loads_the_saved_model_as_ours(saved, auto):
    _, folder = saved
    loaded = auto.from_pretrained(folder).eval()
    assert isinstance(loaded, InfiniteVLForConditionalGeneration)


@pytest.mark.parametrize("auto", LOADERS, ids=lambda auto: auto.__name__)
def test_save_load_round_trip_gives_identical_logits(saved, auto):
    model, folder = saved
    loaded = auto.from_pretrained(folder).eval()
    assert torch.equal(_logits(loaded), _logits(model))


def test_auto_config_loads_the_saved_config_as_ours(saved):
    _, folder = saved
    assert isinstance(AutoConfig.from_pretrained(folder), InfiniteVLConfig)


def test_official_class_name_resolves_to_the_same_model(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = infinitevl_hf.InfiniteVLQwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(loaded), _logits(model))


def _rewrite(folder: Path, edit) -> None:
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    save_file(edit(tensors), weights, metadata={"format": "pt"})


def test_checkpoint_with_legacy_names_loads(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)

    def to_legacy(tensors):
        renamed = {}
        for name, tensor in tensors.items():
            name = name.replace("model.visual.", "visual.").replace("model.language_model.", "model.")
            renamed[name] = tensor
        return renamed

    _rewrite(tmp_path, to_legacy)
    assert any(k.startswith("visual.") for k in load_file(tmp_path / "model.safetensors"))
    loaded = InfiniteVLForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(loaded), _logits(model))


@pytest.mark.parametrize("dropped", ["model.language_model.layers.1.self_attn.A_log", "model.visual.blocks.0.attn.qkv.weight"])
def test_missing_tensors_fail_loudly(tmp_path, dropped):
    tiny_model().save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: {k: v for k, v in t.items() if k != dropped})
    with pytest.raises(ValueError, match="missing tensors"):
        InfiniteVLForConditionalGeneration.from_pretrained(tmp_path)


def test_unexpected_tensors_fail_loudly(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: {**t, "model.language_model.layers.1.self_attn.extra": torch.zeros(2)})
    with pytest.raises(ValueError, match="unexpected tensors"):
        InfiniteVLForConditionalGeneration.from_pretrained(tmp_path)


def test_wrong_shapes_fail_loudly(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    key = "model.language_model.layers.1.self_attn.o_norm.weight"
    _rewrite(tmp_path, lambda t: {**t, key: torch.ones(3)})
    with pytest.raises(Exception, match="(?i)mismatch"):
        InfiniteVLForConditionalGeneration.from_pretrained(tmp_path)


def test_text_model_alone_generates_text(tmp_path):
    model = tiny_model()
    ids = text_ids(1, 6)
    with torch.no_grad():
        out = model.model.language_model(input_ids=ids)
    assert out.last_hidden_state.shape == (1, 6, model.config.text_config.hidden_size)
