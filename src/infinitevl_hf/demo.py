"""The `infinitevl` main job: answer a question about an image, then stream video frames one call at a time
and compare cache memory and time per frame with a same-shape full-attention Qwen2.5-VL.

The comparison model is transformers' `Qwen2_5_VLForConditionalGeneration` with InfiniteVL's sizes and every
weight whose name and shape match copied over (vision tower, embeddings, MLPs, norms, the attention layers);
it keeps a `DynamicCache` that grows with every frame, while `InfiniteVLCache` stops growing once the sliding
window is full.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .modeling.compat import CACHE_KWARG

QUESTION = "What is in this picture?"
STREAM_INSTRUCTION = "You are watching a live video stream of a ball bouncing in a box. Keep track of where it is."


@dataclass
class FrameStat:
    """One streamed frame: tokens fed, cache bytes after it and milliseconds it took, per model."""

    frame: int
    tokens: int
    infinitevl_bytes: int
    infinitevl_ms: float
    teacher_bytes: int | None = None
    teacher_ms: float | None = None


@dataclass
class DemoResult:
    model: str
    answer: str
    frames: list[FrameStat] = field(default_factory=list)
    plot: Path | None = None
    plot_note: str = ""



def _clock(model) -> float:
    """Host time after the device has finished queued work (GPU kernels run asynchronously)."""
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return time.perf_counter()

def load(model_path, device: str = "cpu", dtype=None):
    """(model, processor) of a checkpoint folder or Hub id, with InfiniteVL's Auto classes registered."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from . import registration

    registration.register()
    model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(model_path)
    return model, processor


def draw_frames(count: int, size: int = 112) -> list:
    """`count` procedurally drawn RGB frames: a ball bouncing in a box over a slowly shifting background."""
    from PIL import Image, ImageDraw

    frames = []
    for i in range(count):
        shade = int(40 + 30 * math.sin(i / 7))
        image = Image.new("RGB", (size, size), (shade, 60, 120 - shade // 2))
        draw = ImageDraw.Draw(image)
        draw.rectangle([4, 4, size - 5, size - 5], outline=(230, 230, 230), width=2)
        x = 12 + abs((i * 9) % (2 * (size - 36)) - (size - 36))
        y = 12 + abs((i * 5) % (2 * (size - 36)) - (size - 36))
        draw.ellipse([x, y, x + 20, y + 20], fill=(240, 200, 40))
        draw.text((8, size - 18), f"{i:03d}", fill=(255, 255, 255))
        frames.append(image)
    return frames


def answer_question(model, processor, image, question: str = QUESTION, max_new_tokens: int = 16) -> str:
    """Generate an answer to `question` about `image` (a path or PIL image)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return generate_text(model, processor, processor.apply_chat_template(messages, add_generation_prompt=True),
                         images=[image], max_new_tokens=max_new_tokens)


def generate_text(model, processor, prompt: str, images=None, max_new_tokens: int = 32) -> str:
    inputs = processor(text=prompt, images=images, return_tensors="pt").to(model.device)
    inputs.pop("mm_token_type_ids", None)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]


def teacher_from(model):
    """A full-attention Qwen2.5-VL of the same sizes as the InfiniteVL `model`, sharing every weight whose name
    and shape match (all layers become full attention; Gated DeltaNet layers keep only matching projections)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = model.config
    text = config.get_text_config()
    text_fields = dict(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads, rms_norm_eps=text.rms_norm_eps,
        rope_parameters=dict(text.rope_parameters), max_position_embeddings=text.max_position_embeddings,
        tie_word_embeddings=text.tie_word_embeddings, pad_token_id=text.pad_token_id,
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
    )
    vision = {k: v for k, v in config.vision_config.to_dict().items() if k not in ("model_type", "transformers_version")}
    teacher_config = Qwen2_5_VLConfig(
        text_config=text_fields, vision_config=vision, image_token_id=config.image_token_id,
        video_token_id=config.video_token_id, vision_start_token_id=config.vision_start_token_id,
        vision_end_token_id=config.vision_end_token_id, tie_word_embeddings=text.tie_word_embeddings,
    )
    teacher_config._attn_implementation = "sdpa"
    teacher = Qwen2_5_VLForConditionalGeneration(teacher_config).to(device=model.device, dtype=model.dtype).eval()
    ours = model.state_dict()
    theirs = teacher.state_dict()
    shared = {k: v for k, v in ours.items() if k in theirs and theirs[k].shape == v.shape}
    teacher.load_state_dict(shared, strict=False)
    return teacher, len(shared), len(theirs)


def dynamic_cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def stream_inputs(processor, frames):
    """Per-frame processor outputs: the first carries the instruction, each one frame in a user turn."""
    for i, frame in enumerate(frames):
        text = f"<|im_start|>user\nFrame {i}: <|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        if i == 0:
            text = f"<|im_start|>system\n{STREAM_INSTRUCTION}<|im_end|>\n" + text
        yield processor(text=text, images=[frame], return_tensors="pt")


def stream(model, processor, frames, teacher=None, progress: bool = True) -> list[FrameStat]:
    """Feed `frames` one call at a time through `model` (InfiniteVLCache) and `teacher` (DynamicCache)."""
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    from .modeling import InfiniteVLCache

    cache = InfiniteVLCache(model.config)
    teacher_cache = DynamicCache(config=teacher.config) if teacher is not None else None
    stats = []
    inputs_list = list(stream_inputs(processor, frames))
    for i, inputs in enumerate(tqdm(inputs_list, desc="streaming frames", unit="frame", disable=not progress)):
        inputs = inputs.to(model.device)
        mm_types = inputs.pop("mm_token_type_ids", None)
        with torch.no_grad():
            start = _clock(model)
            model(**inputs, use_cache=True, logits_to_keep=1, **{CACHE_KWARG: cache})
            ours_ms = (_clock(model) - start) * 1000
            stat = FrameStat(i, int(inputs["input_ids"].shape[1]), cache.nbytes, ours_ms)
            if teacher is not None:
                extra = {"mm_token_type_ids": mm_types} if mm_types is not None else {}
                start = _clock(teacher)
                teacher(**inputs, **extra, use_cache=True, logits_to_keep=1, **{CACHE_KWARG: teacher_cache})
                stat.teacher_ms = (_clock(teacher) - start) * 1000
                stat.teacher_bytes = dynamic_cache_bytes(teacher_cache)
        stats.append(stat)
    return stats


def format_table(stats: list[FrameStat], rows: int = 10) -> str:
    """The memory/time table, at most `rows` evenly spaced frames (first and last always shown)."""
    step = max(1, math.ceil(len(stats) / rows))
    shown = sorted({*range(0, len(stats), step), len(stats) - 1})
    head = f"{'frame':>5} {'tokens':>6} | {'InfiniteVL cache':>16} {'ms':>7} | {'full-attention cache':>20} {'ms':>7}"
    lines = [head, "-" * len(head)]
    for i in shown:
        s = stats[i]
        teacher = (f"{_kib(s.teacher_bytes):>20} {s.teacher_ms:7.1f}" if s.teacher_bytes is not None else f"{'-':>20} {'-':>7}")
        lines.append(f"{s.frame:>5} {s.tokens:>6} | {_kib(s.infinitevl_bytes):>16} {s.infinitevl_ms:7.1f} | {teacher}")
    return "\n".join(lines)


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


def plot(stats: list[FrameStat], path: Path) -> tuple[Path | None, str]:
    """Plot cache bytes and ms per frame to `path`; returns (path or None, a sentence saying what happened)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None, "plotting skipped: matplotlib is not installed (pip install infinitevl-hf[plot])"
    frames = [s.frame for s in stats]
    fig, (mem, ms) = plt.subplots(1, 2, figsize=(10, 4))
    mem.plot(frames, [s.infinitevl_bytes / 1024 for s in stats], label="InfiniteVL (SWA + Gated DeltaNet)")
    ms.plot(frames, [s.infinitevl_ms for s in stats], label="InfiniteVL")
    if stats and stats[0].teacher_bytes is not None:
        mem.plot(frames, [s.teacher_bytes / 1024 for s in stats], label="full attention (Qwen2.5-VL shape)")
        ms.plot(frames, [s.teacher_ms for s in stats], label="full attention")
    mem.set(xlabel="frame", ylabel="cache KiB", title="cache memory")
    ms.set(xlabel="frame", ylabel="ms per frame", title="time per frame")
    mem.legend()
    ms.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path, f"plot written to {path}"


def run_demo(model_path, frames: int = 40, image=None, teacher: bool = True, plot_path=None, device: str = "cpu",
             progress: bool = True, echo=print) -> DemoResult:
    """The main job on `model_path`: answer a question about `image` (the bundled demo image by default), then
    stream `frames` synthetic frames and compare with a full-attention model. `echo` receives the report lines."""
    from .tiny import asset_path

    if frames < 1:
        raise ValueError(f"--frames must be at least 1, got {frames}.")
    model, processor = load(model_path, device=device)
    image = image if image is not None else asset_path("demo.png")
    answer = answer_question(model, processor, image)
    result = DemoResult(model=str(model_path), answer=answer)
    echo(f"Q: {QUESTION}  [image: {Path(str(image)).name}]")
    from .cli_inputs import is_random_tiny

    echo(f"A: {answer!r}" + ("  (random weights: the text is meaningless)" if is_random_tiny(str(model_path)) else ""))
    comparison = None
    if teacher:
        comparison, copied, total = teacher_from(model)
        echo(f"Full-attention comparison: Qwen2.5-VL of the same sizes, {copied}/{total} tensors copied from the model.")
    result.frames = stream(model, processor, draw_frames(frames), teacher=comparison, progress=progress)
    echo(f"Streamed {frames} frames, one model call per frame:")
    echo(format_table(result.frames))
    first, last = result.frames[0], result.frames[-1]
    echo(f"InfiniteVL cache: {_kib(first.infinitevl_bytes)} after frame 0, {_kib(last.infinitevl_bytes)} after frame "
         f"{last.frame} (constant once the {model.config.get_text_config().sliding_window}-token window is full).")
    if last.teacher_bytes is not None:
        echo(f"Full-attention cache: {_kib(first.teacher_bytes)} -> {_kib(last.teacher_bytes)} (grows with every frame).")
    if plot_path is not None:
        result.plot, result.plot_note = plot(result.frames, plot_path)
        echo(result.plot_note)
    return result


__all__ = ["DemoResult", "FrameStat", "answer_question", "draw_frames", "format_table", "generate_text", "load",
           "run_demo", "stream", "teacher_from"]
