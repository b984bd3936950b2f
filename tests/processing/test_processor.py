"""InfiniteVLProcessor: images, videos, resolution, padding, errors, agreement with the model (tiny checkpoint)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from infinitevl_hf import InfiniteVLProcessor
from infinitevl_hf.modeling.positions import num_vision_tokens
from infinitevl_hf.tiny import asset_path

IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"


def demo_image():
    return Image.open(asset_path("demo.png")).convert("RGB")


def count(inputs, processor, token):
    return int((inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids(token)).sum())


def test_auto_processor_class(processor):
    assert isinstance(processor, InfiniteVLProcessor)
    assert processor.tokenizer.padding_side == "left"


def test_single_image_token_count_matches_shared_formula(processor):
    inputs = processor(text=f"{IMG}What is this?", images=[demo_image()], return_tensors="pt")
    grid = inputs["image_grid_thw"]
    assert grid.tolist() == [[1, 8, 8]]  # 448x448 -> max_pixels 112x112 -> 8x8 patches of 14
    assert count(inputs, processor, "<|image_pad|>") == int(num_vision_tokens(grid, 2).sum()) == 16
    assert inputs["pixel_values"].shape == (64, 3 * 2 * 14 * 14)


def two_images_one_a_path(processor):
    path = str(asset_path("demo.png"))
    small = demo_image().resize((100, 60))
    return processor(text=f"{IMG} and {IMG}: compare.", images=[path, small], return_tensors="pt")


def test_two_images_one_a_path_give_one_grid_each(processor):
    inputs = two_images_one_a_path(processor)
    assert inputs["image_grid_thw"].shape == (2, 3)


def test_two_images_one_a_path_token_count_matches_shared_formula(processor):
    inputs = two_images_one_a_path(processor)
    assert count(inputs, processor, "<|image_pad|>") == int(num_vision_tokens(inputs["image_grid_thw"], 2).sum())


def test_min_max_pixels_change_token_count(processor):
    base = processor(text=IMG, images=[demo_image()], return_tensors="pt")
    big = processor(text=IMG, images=[demo_image()], images_kwargs={"max_pixels": 224 * 224}, return_tensors="pt")
    tiny_img = demo_image().resize((20, 20))
    up = processor(text=IMG, images=[tiny_img], images_kwargs={"min_pixels": 112 * 112}, return_tensors="pt")
    assert count(big, processor, "<|image_pad|>") == 64 > count(base, processor, "<|image_pad|>") == 16
    assert up["image_grid_thw"].tolist() == [[1, 8, 8]]


def test_video_frames_list(processor):
    frames = [Image.fromarray(np.full((56, 84, 3), 40 * i, dtype=np.uint8)) for i in range(5)]
    inputs = processor(text=f"{VID}Describe.", videos=[frames], return_tensors="pt")
    grid = inputs["video_grid_thw"]
    assert grid.tolist() == [[3, 4, 6]]  # 5 frames padded to 6, two per temporal step
    assert count(inputs, processor, "<|video_pad|>") == int(num_vision_tokens(grid, 2).sum()) == 18
    assert inputs["pixel_values_videos"].shape == (3 * 4 * 6, 3 * 2 * 14 * 14)
    assert inputs["second_per_grid_ts"].tolist() == [1.0]  # 2 frames per step at the default 2 fps
    arrays = processor(text=VID, videos=[np.stack([np.asarray(f) for f in frames])], return_tensors="pt")
    torch.testing.assert_close(arrays["pixel_values_videos"], inputs["pixel_values_videos"])


def test_video_file(processor, tmp_path):
    av = pytest.importorskip("av", reason="PyAV is the optional `video` extra")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(16):  # 2 seconds at 8 fps
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 15 * i, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    inputs = processor(text=f"{VID}What happens?", videos=[str(path)], return_tensors="pt")
    t, h, w = inputs["video_grid_thw"][0].tolist()
    assert (h, w) == (4, 4) and t == 2  # 2 s sampled at 2 fps = 4 frames = 2 temporal steps
    assert count(inputs, processor, "<|video_pad|>") == t * h * w // 4
    with pytest.raises(FileNotFoundError, match="Video file not found: .*missing.mp4"):
        processor(text=VID, videos=[str(tmp_path / "missing.mp4")])


def test_left_padded_batch(processor):
    inputs = processor(text=["Hi", f"{IMG}What is in this image?"], images=[demo_image()], padding=True, return_tensors="pt")
    mask = inputs["attention_mask"]
    assert mask.shape[0] == 2 and mask[0, 0] == 0 and mask[0, -1] == 1 and bool(mask[1].all())
    pad = processor.tokenizer.pad_token_id
    assert bool((inputs["input_ids"][0][mask[0] == 0] == pad).all())


def test_mismatched_image_count(processor):
    with pytest.raises(ValueError, match=r"2 <\|image_pad\|> placeholders but 1 image"):
        processor(text=f"{IMG}{IMG}", images=[demo_image()])
    with pytest.raises(ValueError, match=r"1 <\|image_pad\|> placeholders but 0 image"):
        processor(text=IMG)


def test_unreadable_images_named(processor, tmp_path):
    with pytest.raises(FileNotFoundError, match="Image file not found: .*nothere.png"):
        processor(text=IMG, images=[str(tmp_path / "nothere.png")])
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    with pytest.raises(ValueError, match="Cannot read image .*notes.png.*not a readable image"):
        processor(text=IMG, images=[str(not_image)])


def test_empty_prompt(processor):
    with pytest.raises(ValueError, match="prompt is empty"):
        processor(text="   ")
    with pytest.raises(ValueError, match=r"batch row 1\) is empty"):
        processor(text=["fine", ""])


def test_model_accepts_the_processor_placeholder_count(processor, model):
    inputs = processor(text=f"{IMG}Hi", images=[demo_image()], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits  # the model checks placeholder count against features with the same formula
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()


def test_model_refuses_a_placeholder_count_the_processor_would_not_write(processor, model):
    inputs = processor(text=f"{IMG}Hi", images=[demo_image()], return_tensors="pt")
    with torch.no_grad():
        bad = dict(inputs)
        bad["input_ids"] = inputs["input_ids"].clone()
        first = int((bad["input_ids"][0] == model.config.image_token_id).nonzero()[0])
        bad["input_ids"][0, first] = processor.tokenizer.convert_tokens_to_ids("Hi") or 40
        with pytest.raises(ValueError, match="image features and image tokens do not match"):
            model(**bad)


def test_generate_end_to_end_with_image(processor, model):
    messages = [{"role": "user", "content": [{"type": "image", "path": str(asset_path("demo.png"))},
                                             {"type": "text", "text": "What is in this image?"}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert processor.decode(inputs["input_ids"][0]).endswith("<|im_start|>assistant\n")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4) or out.shape[1] <= inputs["input_ids"].shape[1] + 4
    assert isinstance(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:])[0], str)


def test_batched_generate_with_an_image_row_beside_a_video_row(processor, model):
    frames = [np.full((56, 56, 3), 30 * i, dtype=np.uint8) for i in range(4)]
    inputs = processor(
        text=[f"{IMG}Describe.", f"{VID}And this?"], images=[demo_image()], videos=[frames], padding=True, return_tensors="pt"
    )
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2
