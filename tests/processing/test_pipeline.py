"""The tiny checkpoint, transformers' image-text-to-text pipeline and streaming generation."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from PIL import Image

from infinitevl_hf import InfiniteVLForConditionalGeneration, InfiniteVLProcessor, tiny_checkpoint
from infinitevl_hf.tiny import SPECIAL_TOKENS, asset_path


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """A tiny checkpoint written with seed 3, the seconds the write took, and its model and processor loaded."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    start = time.perf_counter()
    path = tiny_checkpoint(tmp_path_factory.mktemp("seeded") / "tiny", seed=3)
    seconds = time.perf_counter() - start
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    return path, seconds, model, processor


def test_tiny_checkpoint_writes_fast(seeded):
    _, seconds, _, _ = seeded
    assert seconds < 10


def test_tiny_checkpoint_writes_every_file(seeded):
    path, _, _, _ = seeded
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "chat_template.jinja"):
        assert (path / name).is_file(), name


def test_tiny_checkpoint_loads_with_the_auto_classes(seeded):
    _, _, model, processor = seeded
    assert isinstance(model, InfiniteVLForConditionalGeneration) and isinstance(processor, InfiniteVLProcessor)


def test_tiny_checkpoint_config_names_the_tokenizer_special_tokens(seeded):
    _, _, model, processor = seeded
    tokenizer, config = processor.tokenizer, model.config
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    assert config.image_token_id == ids["<|image_pad|>"] and config.video_token_id == ids["<|video_pad|>"]
    assert config.vision_start_token_id == ids["<|vision_start|>"] and config.vision_end_token_id == ids["<|vision_end|>"]
    assert config.text_config.eos_token_id == ids["<|im_end|>"] and config.text_config.pad_token_id == ids["<|endoftext|>"]
    assert config.text_config.vocab_size >= len(tokenizer)


def test_tiny_checkpoint_same_seed_round_trips_to_the_same_weights(seeded, tmp_path):
    from transformers import AutoModelForImageTextToText

    _, _, model, processor = seeded
    again = tiny_checkpoint(tmp_path / "again", seed=3)
    inputs = processor(text="<|vision_start|><|image_pad|><|vision_end|>hello", images=[str(asset_path("demo.png"))],
                       return_tensors="pt")
    with torch.no_grad():
        first = model(**inputs).logits
        second = AutoModelForImageTextToText.from_pretrained(again).eval()(**inputs).logits
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # same seed, same weights, after a save/load


def test_tiny_checkpoint_refuses_a_folder_that_is_not_empty(seeded):
    path, _, _, _ = seeded
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        tiny_checkpoint(path)


def test_tiny_checkpoint_replaces_its_own_folder_when_asked(tmp_path):
    path = tiny_checkpoint(tmp_path / "tiny", seed=1)
    again = tiny_checkpoint(path, seed=2, overwrite=True)  # a script making one, run twice
    assert (again / "config.json").is_file() and not any(p.name.startswith(".tiny.") for p in tmp_path.iterdir())


def test_tiny_checkpoint_never_replaces_a_folder_it_did_not_write(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a folder infinitevl-hf wrote"):
        tiny_checkpoint(folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "keep me"


def test_demo_image_is_small():
    path = asset_path("demo.png")
    assert path.stat().st_size < 50_000
    assert Image.open(path).size == (448, 448)


def test_pipeline_answers_chat_with_images(tiny_dir):
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=str(tiny_dir))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.open(asset_path("demo.png"))},
                {"type": "image", "path": str(asset_path("demo.png"))},
                {"type": "text", "text": "What is in these images?"},
            ],
        }
    ]
    out = pipe(text=messages, max_new_tokens=4, return_full_text=False)
    assert isinstance(out[0]["generated_text"], str)
    single = pipe(images=str(asset_path("demo.png")), text="<|vision_start|><|image_pad|><|vision_end|>Describe.",
                  max_new_tokens=3, return_full_text=False)
    assert isinstance(single[0]["generated_text"], str)


def test_streamers_yield_text(processor, model):
    from transformers import TextIteratorStreamer, TextStreamer

    messages = [{"role": "user", "content": [{"type": "image", "path": str(asset_path("demo.png"))},
                                             {"type": "text", "text": "Describe the image."}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    # Random weights: forbid the end token so the stream has text to carry.
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    kwargs = dict(**inputs, max_new_tokens=6, do_sample=False, suppress_tokens=[eos])

    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = threading.Thread(target=model.generate, kwargs=dict(kwargs, streamer=streamer))
    thread.start()
    pieces = list(streamer)
    thread.join()
    out = model.generate(**kwargs)
    expected = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "".join(pieces) == expected

    printed = []

    class Collect(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            printed.append(text)

    model.generate(**kwargs, streamer=Collect(processor.tokenizer, skip_prompt=True, skip_special_tokens=True))
    assert "".join(printed) == expected
