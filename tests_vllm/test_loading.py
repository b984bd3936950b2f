"""Weights load under both official namings, and a checkpoint tensor the model does not have is refused."""

from __future__ import annotations

import json
import re

import pytest
from safetensors.torch import load_file, save_file
from vllm.inputs import TokensPrompt

from test_errors import _engine, _message
from test_generate import TEACHER_FORCED, _text_ids


def _rewrite(checkpoint, target, rename):
    import shutil

    shutil.copytree(checkpoint, target)
    tensors = load_file(target / "model.safetensors")
    save_file({rename(k): v.contiguous() for k, v in tensors.items()}, target / "model.safetensors", metadata={"format": "pt"})
    return target


def _legacy(name: str) -> str:
    """transformers 5 names -> the names transformers 4.5x wrote (`visual.*`, `model.layers.*`)."""
    return re.sub(r"^model\.language_model\.", "model.", re.sub(r"^model\.visual\.", "visual.", name))


def _official_layout(path) -> None:
    """config.json as the official release writes it: text fields flat at the top, its class name."""
    config = json.loads((path / "config.json").read_text())
    text = config.pop("text_config")
    config.update({k: v for k, v in text.items() if k != "model_type"})
    config["architectures"] = ["InfiniteVLQwen2_5_VLForConditionalGeneration"]
    (path / "config.json").write_text(json.dumps(config))


def test_official_release_layout_gives_the_same_logprobs(llm, reference, checkpoint, tmp_path):
    """Legacy tensor names, a flat config.json and the official class name load to the very same model."""
    legacy = _rewrite(checkpoint, tmp_path / "legacy", _legacy)
    _official_layout(legacy)
    assert any(k.startswith("visual.") for k in load_file(legacy / "model.safetensors"))
    ids = [TokensPrompt(prompt_token_ids=_text_ids(reference[1]))]
    expected = llm.generate(ids, TEACHER_FORCED)[0].prompt_logprobs
    got = _engine(legacy).generate(ids, TEACHER_FORCED)[0].prompt_logprobs
    assert [{t: lp.logprob for t, lp in d.items()} for d in got[1:]] == [{t: lp.logprob for t, lp in d.items()} for d in expected[1:]]


def test_unexpected_tensor_is_refused(checkpoint, tmp_path):
    import torch

    path = _rewrite(checkpoint, tmp_path / "extra", lambda k: k)
    tensors = load_file(path / "model.safetensors")
    tensors["model.language_model.layers.1.self_attn.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Exception) as info:
        _engine(path)
    assert "Unexpected Gated DeltaNet tensor" in _message(info.value)


@pytest.mark.parametrize(
    "name, named",
    [
        ("model.language_model.layers.1.self_attn.k_conv1d.weight", "layers.1.self_attn` conv tensors ['k_conv1d.weight']"),
        ("model.language_model.layers.2.mlp.down_proj.weight", "layers.2.mlp.down_proj.weight"),
        ("model.language_model.layers.0.self_attn.v_proj.weight", "layers.0.self_attn.qkv_proj.weight"),  # one piece of a fused one
        ("model.language_model.layers.3.self_attn.g_proj.weight", "layers.3.self_attn.in_proj_qkvz.weight"),
    ],
    ids=["gdn-conv", "mlp", "attention-v", "gdn-gate"],
)
def test_missing_tensor_is_refused(checkpoint, tmp_path, name, named):
    path = _rewrite(checkpoint, tmp_path / "missing", lambda k: k)
    tensors = load_file(path / "model.safetensors")
    del tensors[name]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Exception) as info:
        _engine(path)
    assert named in _message(info.value)
