"""A saved checkpoint loads with trust_remote_code=True in a Python where `infinitevl_hf` cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import infinitevl_hf.export as export
from infinitevl_hf.modeling.remote_code import (
    AUTO_MAP,
    flat_name,
    flatten_relative_imports,
    remote_code_files,
    resolve_relative,
)
from infinitevl_hf.tiny import tiny_checkpoint

from helpers import tiny_model

IDS = [[5, 17, 33, 42, 8, 99, 23, 61, 7, 12, 3, 45, 77, 19, 28, 50, 64, 11, 9, 30]]

# Runs in a fresh interpreter: `infinitevl_hf` is unimportable, whatever sys.path or installs say.
CHILD = textwrap.dedent(
    """
    import sys

    class _Blocked:
        def find_spec(self, name, path=None, target=None):
            if name == "infinitevl_hf" or name.startswith("infinitevl_hf."):
                raise ImportError("infinitevl_hf is blocked in this test")

    sys.meta_path.insert(0, _Blocked())
    import json, torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    folder, out, resave, ids = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    try:
        import infinitevl_hf  # noqa: F401
        raise SystemExit("infinitevl_hf was importable")
    except ImportError:
        pass
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    result = {"config": type(config).__module__ + "." + type(config).__name__}
    ids = torch.tensor(ids)
    for auto in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
        model = auto.from_pretrained(folder, trust_remote_code=True).eval()
        assert "transformers_modules" in type(model).__module__, type(model).__module__
        with torch.no_grad():
            result[auto.__name__] = model(input_ids=ids).logits
    model.save_pretrained(resave)
    again = AutoModelForImageTextToText.from_pretrained(resave, trust_remote_code=True).eval()
    with torch.no_grad():
        result["resaved"] = again(input_ids=ids).logits
    if len(sys.argv) > 5:
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        result["processor"] = type(processor).__module__ + "." + type(processor).__name__
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}], add_generation_prompt=True)
        result["prompt_ids"] = processor(text=prompt, return_tensors="pt")["input_ids"]
        from PIL import Image
        from transformers import pipeline

        pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
        image = Image.new("RGB", (64, 48), (200, 30, 30))
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Colour?"}]}]
        answer = pipe(text=messages, max_new_tokens=3, do_sample=False, return_full_text=False)
        result["pipeline_answer"] = answer[0]["generated_text"]
        result["pipeline_model"] = type(pipe.model).__module__
    torch.save(result, out)
    """
)


def _run_blocked(tmp_path: Path, folder: Path, with_processor: bool = False) -> dict:
    out, resave = tmp_path / "remote.pt", tmp_path / "resaved"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    env["HF_HUB_OFFLINE"] = "1"
    args = [sys.executable, "-c", CHILD, str(folder), str(out), str(resave), json.dumps(IDS)]
    if with_processor:
        args.append("processor")
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=False)


def test_save_pretrained_loads_without_the_package(tmp_path):
    model = tiny_model()
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    assert {"modeling_infinitevl.py", "configuration_infinitevl.py", "ops_gated_delta_rule_reference.py"} <= {
        p.name for p in folder.iterdir()}
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(IDS)).logits
    result = _run_blocked(tmp_path, folder)
    assert result["config"].endswith("configuration_infinitevl.InfiniteVLConfig")
    for key in ("AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText", "resaved"):
        torch.testing.assert_close(result[key], expected, rtol=1e-5, atol=1e-5, msg=key)


def test_tiny_checkpoint_with_processor_loads_without_the_package(tmp_path):
    import infinitevl_hf  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = tiny_checkpoint(tmp_path / "tiny")  # model and processor save_pretrained alone make it self-contained
    assert json.loads((folder / "processor_config.json").read_text())["auto_map"] == {
        "AutoProcessor": "processing_infinitevl.InfiniteVLProcessor"}
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(IDS)).logits
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}], add_generation_prompt=True)
    result = _run_blocked(tmp_path, folder, with_processor=True)
    torch.testing.assert_close(result["AutoModelForImageTextToText"], expected, rtol=1e-5, atol=1e-5)
    assert result["processor"].endswith("processing_infinitevl.InfiniteVLProcessor")
    # pipeline("image-text-to-text", trust_remote_code=True) answers a chat with an image, package blocked
    assert isinstance(result["pipeline_answer"], str) and "transformers_modules" in result["pipeline_model"]
    assert torch.equal(result["prompt_ids"], processor(text=prompt, return_tensors="pt")["input_ids"])


def test_official_class_name_resolves(tmp_path):
    files = remote_code_files()
    assert "class InfiniteVLQwen2_5_VLForConditionalGeneration(" in files["modeling_infinitevl.py"]


def test_save_pretrained_writes_a_model_card(tmp_path):
    from huggingface_hub import ModelCard

    tiny_model().save_pretrained(tmp_path / "ckpt")
    card = ModelCard.load(tmp_path / "ckpt" / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
    (tmp_path / "ckpt" / "README.md").write_text("mine")
    tiny_model().save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "README.md").read_text() == "mine"  # an existing card is kept


def _source_without_remote_code(tmp_path):
    source = tmp_path / "src"
    tiny_model().save_pretrained(source, remote_code_files=False)
    return source


def test_export_checkpoint_adds_the_remote_code_with_a_card(tmp_path):
    source = _source_without_remote_code(tmp_path)
    assert not (source / "modeling_infinitevl.py").exists()
    out = export.export_checkpoint(source, tmp_path / "out")
    assert (out / "modeling_infinitevl.py").is_file() and (out / "README.md").is_file()


def test_export_checkpoint_refuses_existing_output(tmp_path):
    source = _source_without_remote_code(tmp_path)
    out = export.export_checkpoint(source, tmp_path / "out")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        export.export_checkpoint(source, out)


def test_export_checkpoint_refuses_a_missing_source_writing_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        export.export_checkpoint(tmp_path / "nope", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


# -- the import rewrite, line by line ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "module, is_package, line, expected",
    [
        (("modeling", "gated_deltanet"), False, "from .ops import causal_conv1d\n", "from .ops import causal_conv1d\n"),
        (("modeling", "ops", "gated_delta_rule"), True, "from ..backend import FLA\n", "from .ops_backend import FLA\n"),
        (("modeling", "ops", "gated_delta_rule"), True, "from .reference import (\n", "from .ops_gated_delta_rule_reference import (\n"),
        (("modeling", "ops", "causal_conv1d", "cuda"), False, "    from ..backend import x  # lazy\n", "    from .ops_backend import x  # lazy\n"),
        (("processing", "processing_infinitevl"), False, "from ..modeling.positions import f\n", "from .positions import f\n"),
        (("modeling", "ops"), True, "from .gated_delta_rule.reference import l2norm\n", "from .ops_gated_delta_rule_reference import l2norm\n"),
    ],
)
def test_flatten_relative_imports(module, is_package, line, expected):
    source = line if not line.rstrip().endswith("(") else line + "    a,\n)\n"
    if line.startswith("    "):
        source = "def f():\n" + line
    rewritten = flatten_relative_imports(source, module, is_package)
    assert expected in rewritten


def test_flatten_leaves_everything_but_relative_imports():
    source = '"""Docs:\nfrom .nothing import here\n"""\nimport torch\nfrom torch import nn\n'
    assert flatten_relative_imports(source, ("modeling", "x")) == source


def test_flatten_refuses_what_the_loader_cannot_follow():
    with pytest.raises(ValueError, match="cannot be flattened"):
        flatten_relative_imports("from . import cache\n", ("modeling", "x"))
    with pytest.raises(ValueError, match="above the package root"):
        resolve_relative(("modeling", "x"), False, 4, "y")
    assert flat_name(("modeling", "ops", "__init__")) == "ops"
