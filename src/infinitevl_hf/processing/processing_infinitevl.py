"""InfiniteVL processor: transformers' Qwen2.5-VL processor with InfiniteVL's input checks.

What is reused unchanged: the Qwen2.5-VL image processor (resize to `min_pixels`..`max_pixels`, 14-pixel
patches, 2x2 merge), video processor, tokenizer and chat template. What differs:

- the number of placeholder tokens per image/video comes from `positions.num_vision_tokens`, the formula
  the model checks features against, so prompt and model cannot disagree;
- images given as paths are opened here and a path that is missing or not an image is named in the error;
- videos given as a file path are decoded with PyAV (`pip install infinitevl-hf[video]`);
- empty prompts are refused, and batches are left-padded by default (what `generate()` needs).
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

from ..modeling.positions import num_vision_tokens
from ..modeling.remote_code import write_processor_remote_code

VIDEO_EXTRA_HINT = "pip install infinitevl-hf[video]"


class InfiniteVLFrameVideoProcessor:
    """Videos as frame sequences, processed like Qwen2.5-VL videos without torchvision.

    Every frame of a video is resized (bicubic) to the one size `smart_resize` gives the first frame within
    `min_pixels`..`max_pixels` (defaults: the image processor's), scaled to [0, 1] and normalised with the image
    processor's mean/std; the frame count is padded to a multiple of `temporal_patch_size` by repeating the
    last frame, and each group of `temporal_patch_size` frames becomes one temporal grid step.
    Output: `pixel_values_videos` [sum(t*h*w), C*tp*p*p], `video_grid_thw` [N, 3], `video_metadata`.
    """

    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(self, image_processor, fps: float = 2.0):
        self.image_processor = image_processor
        self.fps = fps

    def __getattr__(self, name):
        if name in ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std", "size"):
            return getattr(self.image_processor, name)
        raise AttributeError(name)

    def __call__(self, videos, video_metadata=None, min_pixels=None, max_pixels=None, size=None, return_tensors=None, **kwargs):
        import numpy as np
        from PIL import Image
        from transformers.image_processing_utils import BatchFeature
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
        from transformers.video_utils import VideoMetadata, make_batched_videos

        size = dict(size or self.image_processor.size)
        min_pixels = min_pixels or size.get("shortest_edge")
        max_pixels = max_pixels or size.get("longest_edge")
        patch, merge, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]
        videos = make_batched_videos(videos)
        metadata = list(video_metadata) if video_metadata is not None else [None] * len(videos)
        all_patches, grids, out_metadata = [], [], []
        for video, meta in zip(videos, metadata):
            frames = [Image.fromarray(np.asarray(f, dtype=np.uint8)).convert("RGB") for f in _frames_hwc(video)]
            if not frames:
                raise ValueError("A video has no frames.")
            height, width = smart_resize(frames[0].height, frames[0].width, patch * merge, min_pixels, max_pixels)
            array = np.stack([np.asarray(f.resize((width, height), Image.BICUBIC), dtype=np.float32) for f in frames])
            array = (array.transpose(0, 3, 1, 2) / 255.0 - mean) / std  # [T, C, H, W]
            if len(array) % tp:
                array = np.concatenate([array, np.repeat(array[-1:], tp - len(array) % tp, axis=0)])
            gt, gh, gw = len(array) // tp, height // patch, width // patch
            channels = array.shape[1]
            patches = array.reshape(gt, tp, channels, gh // merge, merge, patch, gw // merge, merge, patch)
            patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gt * gh * gw, channels * tp * patch * patch)
            all_patches.append(patches)
            grids.append([gt, gh, gw])
            if meta is None:
                meta = VideoMetadata(total_num_frames=len(frames), fps=self.fps)
            elif isinstance(meta, dict):
                meta = VideoMetadata(**meta)
            out_metadata.append(meta)
        data = {
            "pixel_values_videos": np.concatenate(all_patches).astype(np.float32),
            "video_grid_thw": np.asarray(grids, dtype=np.int64),
        }
        result = BatchFeature(data, tensor_type=return_tensors)
        result["video_metadata"] = out_metadata
        return result


def _frames_hwc(video):
    """Frames of one video as [H, W, C] uint8 arrays (accepts [T, H, W, C], [T, C, H, W], lists of PIL/arrays)."""
    import numpy as np

    frames = []
    for frame in video:
        array = np.asarray(frame)
        if hasattr(frame, "detach"):
            array = frame.detach().cpu().numpy()
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = array.transpose(1, 2, 0)
        if array.dtype != np.uint8:
            array = np.clip(array * 255.0 if array.max() <= 1.0 else array, 0, 255).astype(np.uint8)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        frames.append(array[..., :3] if array.shape[-1] != 1 else np.repeat(array, 3, axis=-1))
    return frames


class InfiniteVLProcessor(Qwen2_5_VLProcessor):
    r"""
    Turns text (with `<|image_pad|>` / `<|video_pad|>` placeholders, usually written by the chat template)
    plus images and videos into the model's inputs: `input_ids`, `attention_mask`, `pixel_values`,
    `image_grid_thw`, `pixel_values_videos`, `video_grid_thw`, `second_per_grid_ts`.

    Images: PIL images, arrays, tensors, or file paths. Videos: a list of frames (PIL images or arrays),
    a `[frames, H, W, C]` array, or a video file path (needs PyAV). Resolution: pass
    `images_kwargs={"min_pixels": ..., "max_pixels": ...}` (or `size={"shortest_edge": ..., "longest_edge": ...}`).
    Each image of H x W pixels (after resizing to multiples of 28) takes `H/14 * W/14 / 4` tokens.

    Example:

    ```python
    >>> import infinitevl_hf
    >>> from transformers import AutoProcessor
    >>> processor = AutoProcessor.from_pretrained(infinitevl_hf.tiny_checkpoint("/tmp/tiny"))
    >>> messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    >>> prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    >>> inputs = processor(text=prompt, images=[infinitevl_hf.tiny.asset_path("demo.png")], return_tensors="pt")
    >>> inputs["image_grid_thw"].tolist()
    [[1, 8, 8]]
    ```
    """

    # Left padding by default: `generate()` appends new tokens on the right of every row.
    text_kwargs = {"padding_side": "left"}

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        kwargs.pop("video_processor", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # generate() appends on the right; a call may still pass padding_side
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
        # Videos go through the image processor's settings, so neither torchvision nor a separate config is needed.
        self.video_processor = InfiniteVLFrameVideoProcessor(image_processor)

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]

    # -- placeholder counts: one formula, shared with the model --------------------------------------------
    def save_pretrained(self, save_directory, *args, **kwargs):
        """`ProcessorMixin.save_pretrained`, plus the code files and `auto_map` that let the folder load with
        `AutoProcessor.from_pretrained(..., trust_remote_code=True)` where this package is not installed."""
        files = super().save_pretrained(save_directory, *args, **kwargs)
        write_processor_remote_code(save_directory)
        return files

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        grid = image_inputs["image_grid_thw"][image_idx]
        return self.image_token * int(num_vision_tokens(_as_tensor(grid), self.image_processor.merge_size))

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        grid = video_inputs["video_grid_thw"][video_idx]
        return self.video_token * int(num_vision_tokens(_as_tensor(grid), self.video_processor.merge_size))

    # -- input checks and loading ----------------------------------------------------------------------------
    def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
        _check_prompts(text)
        if images is not None:
            images = _open_images(images)
        return super().prepare_inputs_layout(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs):
        kwargs = _pixels_to_size(kwargs, self.image_processor)
        if text is not None:
            _check_placeholders(text, images, self.image_token, "image")
            _check_placeholders(text, videos, self.video_token, "video")
        if videos is not None and "video_metadata" not in kwargs:
            # Video files are decoded here so their frame rate reaches the video processor (mRoPE time axis).
            videos, metadata = _decode_videos(videos, fps=getattr(self.video_processor, "fps", None))
            if metadata is not None:
                kwargs["video_metadata"] = metadata
        return super().__call__(images=images, text=text, videos=videos, audio=audio, **kwargs)


def _pixels_to_size(kwargs: dict, image_processor) -> dict:
    """Per-call `min_pixels`/`max_pixels` (top level or in `images_kwargs`) as the `size` every 5.x release reads."""
    images_kwargs = dict(kwargs.pop("images_kwargs", None) or {})
    bounds = {key: images_kwargs.pop(key, kwargs.pop(key, None)) for key in ("min_pixels", "max_pixels")}
    if any(value is not None for value in bounds.values()):
        size = dict(images_kwargs.get("size") or getattr(image_processor, "size", None) or {})
        if bounds["min_pixels"] is not None:
            size["shortest_edge"] = bounds["min_pixels"]
        if bounds["max_pixels"] is not None:
            size["longest_edge"] = bounds["max_pixels"]
        images_kwargs["size"] = size
    if images_kwargs:
        kwargs["images_kwargs"] = images_kwargs
    return kwargs


def _count_images(images) -> int:
    """Images given as one image, a list, or a list of per-sample lists."""
    if images is None:
        return 0
    if isinstance(images, (list, tuple)):
        return sum(_count_images(image) for image in images)
    return 1


def _count_videos(videos) -> int:
    """Videos given as one path/array/frame list, or a list of those."""
    if videos is None:
        return 0
    if not isinstance(videos, (list, tuple)):
        return 1
    if videos and not isinstance(videos[0], (list, tuple, str, os.PathLike)) and getattr(videos[0], "ndim", 3) == 3:
        return 1  # one video as a flat list of frames
    return len(videos)


def _check_placeholders(text, items, token: str, kind: str) -> None:
    """Name the mismatch between placeholders in the text and the images/videos given, on every 5.x release."""
    texts = [text] if isinstance(text, str) else list(text)
    found = sum(t.count(token) for t in texts)
    given = _count_images(items) if kind == "image" else _count_videos(items)
    if found != given:
        raise ValueError(f"The text has {found} {token} placeholders but {given} {kind}(s) were given.")


def _as_tensor(grid):
    import torch

    return grid if isinstance(grid, torch.Tensor) else torch.as_tensor(grid)


def _check_prompts(text) -> None:
    if text is None:
        return
    prompts = [text] if isinstance(text, str) else text
    if isinstance(prompts, (list, tuple)) and len(prompts) == 0:
        raise ValueError("`text` is an empty list: give at least one prompt.")
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str) and not prompt.strip():
            where = "" if isinstance(text, str) else f" (batch row {i})"
            raise ValueError(f"The prompt{where} is empty: give some text, e.g. from `apply_chat_template`.")


def _is_path(item) -> bool:
    return isinstance(item, (str, os.PathLike)) and not str(item).startswith(("http://", "https://", "data:"))


def _open_image(path):
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Image file not found: {str(path)!r}.")
    if not path.is_file():
        raise ValueError(f"Cannot read image {str(path)!r}: it is not a file.")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB") if image.mode != "RGB" else image.copy()
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"Cannot read image {str(path)!r}: not a readable image file ({error}).") from error


def _open_images(images):
    """Open every image given as a local path (nested lists kept); leave everything else as it is."""
    if _is_path(images):
        return _open_image(images)
    if isinstance(images, (list, tuple)):
        return [_open_images(item) for item in images]
    return images


def read_video(path, fps: float | None = None):
    """Decode a video file with PyAV into (frames [T, H, W, 3] uint8, VideoMetadata), sampling `fps` frames per
    second (all frames when None). Raises ImportError without PyAV and names the file when it cannot be read."""
    try:
        import av  # noqa: F401
    except ImportError as error:
        raise ImportError(f"Reading a video file needs PyAV: {VIDEO_EXTRA_HINT}") from error
    from transformers.video_utils import load_video

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Video file not found: {str(path)!r}.")
    try:
        frames, metadata = load_video(str(path), fps=fps, backend="pyav")
    except Exception as error:
        raise ValueError(f"Cannot read video {str(path)!r}: not a readable video file ({error}).") from error
    if len(frames) == 0:
        raise ValueError(f"Cannot read video {str(path)!r}: it has no frames.")
    return frames, metadata


def _decode_videos(videos, fps=None):
    """Decode video paths; returns (videos, metadata list or None when no video was a path)."""
    if _is_path(videos):
        videos = [videos]
    if not (isinstance(videos, (list, tuple)) and any(_is_path(v) for v in videos)):
        return videos, None
    decoded, metadata = [], []
    for video in videos:
        if _is_path(video):
            frames, meta = read_video(video, fps=fps)
        else:
            frames, meta = video, None
        decoded.append(frames)
        metadata.append(meta)
    return decoded, metadata


__all__ = ["InfiniteVLFrameVideoProcessor", "InfiniteVLProcessor", "read_video"]
