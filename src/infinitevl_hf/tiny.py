"""A tiny random-weight InfiniteVL checkpoint, written in seconds on CPU, for tests, demos and the CLI.

The folder is a complete checkpoint: `config.json`, `model.safetensors`, a byte-level BPE tokenizer
with the Qwen2.5-VL special tokens and chat template, and image/video processor settings. It loads with
the Auto classes once `infinitevl_hf` is imported:

```python
>>> import infinitevl_hf
>>> from transformers import AutoModelForImageTextToText, AutoProcessor
>>> path = infinitevl_hf.tiny_checkpoint("/tmp/tiny-infinitevl")
>>> model = AutoModelForImageTextToText.from_pretrained(path)
>>> processor = AutoProcessor.from_pretrained(path)
```

Its answers are random text: the weights are random. Nothing is downloaded: the tokenizer is
trained on `assets/tiny_corpus.txt` (shipped with the package) at call time.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import torch

from .staged import staged_folder

# The Qwen2.5-VL special tokens, in the official order (their ids follow the BPE vocabulary here).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
TINY_BPE_VOCAB = 512
# Small images keep the tiny model fast: a 448x448 picture becomes 8x8 patches of 14 pixels, 16 tokens.
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 112 * 112


def asset_path(name: str) -> Path:
    """Path of a file shipped in `infinitevl_hf/assets/` (chat template, tokenizer corpus, demo image)."""
    return Path(str(resources.files("infinitevl_hf").joinpath("assets", name)))


def chat_template() -> str:
    """The Qwen2.5-VL chat template (system/user/assistant turns, vision placeholders)."""
    return asset_path("chat_template.jinja").read_text(encoding="utf-8")


def tiny_tokenizer():
    """A Qwen2-style byte-level BPE tokenizer (`Qwen2Tokenizer`) with a 512-entry vocabulary plus the
    Qwen2.5-VL special tokens, trained offline on `assets/tiny_corpus.txt`. Deterministic."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BPE_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = asset_path("tiny_corpus.txt").read_text(encoding="utf-8")
    bpe.train_from_iterator(corpus.splitlines(), trainer=trainer)
    vocab = bpe.get_vocab()
    merges = _merges(bpe)
    # Special tokens right after the BPE entries, in Qwen's order (<|endoftext|> first).
    vocab.update({token: len(vocab) + i for i, token in enumerate(SPECIAL_TOKENS) if token not in vocab})
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        padding_side="left",
        chat_template=chat_template(),
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    return tokenizer


def _merges(bpe) -> list[tuple[str, str]]:
    import json

    model = json.loads(bpe.to_str())["model"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def tiny_config(tokenizer, **text_overrides):
    """Config of the tiny model, its token ids taken from `tokenizer`: hidden 64, 4 decoder layers
    alternating sliding-window attention (window 64) and Gated DeltaNet, a 2-block vision tower with
    14-pixel patches and a 2x2 merger."""
    from .modeling import InfiniteVLConfig

    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    vocab_size = -(-len(tokenizer) // 64) * 64
    text = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        layer_types=["sliding_attention", "linear_attention", "sliding_attention", "linear_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        num_linear_heads=2,
        num_linear_key_value_heads=2,
        linear_head_dim=16,
        expand_v=2,
        sliding_window=64,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0},
        max_position_embeddings=32768,
        prefill_chunk_tokens=8192,
        tie_word_embeddings=True,
        pad_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        bos_token_id=None,
    )
    text.update(text_overrides)
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=text["hidden_size"],
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[1],
        tokens_per_second=2,
    )
    return InfiniteVLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"],
        tie_word_embeddings=True,
        pad_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
    )


def tiny_processor(tokenizer=None):
    """`InfiniteVLProcessor` for the tiny model: its tokenizer, and image/video processors that resize
    to between 56x56 and 112x112 pixels."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from .processing import InfiniteVLProcessor

    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    sizes = dict(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS, patch_size=14, merge_size=2, temporal_patch_size=2)
    return InfiniteVLProcessor(
        image_processor=Qwen2VLImageProcessorPil(**sizes),
        tokenizer=tokenizer,
        chat_template=chat_template(),
    )


def tiny_checkpoint(path: str | os.PathLike, seed: int = 0, overwrite: bool = False, **text_overrides) -> Path:
    """Write a tiny random-weight InfiniteVL checkpoint folder at `path` and return it.

    The folder holds `config.json`, `generation_config.json`, `model.safetensors` and the processor
    files (tokenizer, chat template, image/video processor configs). `seed` fixes the weights;
    `text_overrides` change text-config fields (e.g. `sliding_window=8`). An existing non-empty
    folder is refused, unless `overwrite=True` and this package wrote it (a tiny checkpoint written before, so
    that a script making one runs twice); the folder appears whole or not at all.
    """
    from .modeling import InfiniteVLForConditionalGeneration

    path = Path(path)
    # staged_folder refuses the folder (before anything is built) unless it is empty or, with overwrite, ours
    with staged_folder(path, overwrite=overwrite, kind="tiny-checkpoint", what="Tiny checkpoint folder",
                       flag="overwrite=True") as staging:
        processor = tiny_processor()
        config = tiny_config(processor.tokenizer, **text_overrides)
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            model = InfiniteVLForConditionalGeneration(config).eval()
        finally:
            torch.random.set_rng_state(state)
        model.generation_config.pad_token_id = config.pad_token_id
        model.generation_config.eos_token_id = config.eos_token_id
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
    return path


__all__ = ["tiny_checkpoint", "tiny_config", "tiny_processor", "tiny_tokenizer", "asset_path", "chat_template"]
