"""Hub model cards for InfiniteVL checkpoints, rendered from the templates in `infinitevl_hf/model_cards/`.

Templates are Markdown with YAML front matter and `{{name}}` placeholders. Rendering is strict (an unknown or
missing placeholder is an error) and the result is parsed with `huggingface_hub.ModelCard` and its metadata
checked locally; nothing is sent to the Hub.

```python
>>> from infinitevl_hf.cards import render_model_card
>>> card = render_model_card("infinitevl-4b")
>>> card.data.base_model
'Qwen/Qwen2.5-VL-3B-Instruct'
```
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path

# kind -> template file in infinitevl_hf/model_cards/
TEMPLATES = {
    "infinitevl-4b": "infinitevl-4b.md",
    "infinitevl-4b-longsft": "infinitevl-4b-longsft.md",
    "converted": "converted.md",
    "checkpoint": "checkpoint.md",
}
OFFICIAL_REPOS = {"infinitevl-4b": "hustvl/InfiniteVL", "infinitevl-4b-longsft": "hustvl/InfiniteVL-LongSFT"}
REQUIRED_METADATA = {"library_name": "transformers", "pipeline_tag": "image-text-to-text"}
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def template_text(kind: str) -> str:
    """The raw template of `kind` (one of `TEMPLATES`)."""
    if kind not in TEMPLATES:
        raise ValueError(f"Unknown model card kind {kind!r}; choose one of {', '.join(TEMPLATES)}.")
    return resources.files("infinitevl_hf").joinpath("model_cards", TEMPLATES[kind]).read_text(encoding="utf-8")


def architecture_summary(config=None) -> str:
    """Markdown bullet list describing the architecture of `config` (an `InfiniteVLConfig`); the 4B layout without one."""
    if config is None:
        return (
            "- Vision: the Qwen2.5-VL vision tower (32 blocks, width 1280, window attention) and its 2x2 patch merger.\n"
            "- Decoder: 36 layers, hidden size 2048, in 9 hybrid blocks of 1 sliding-window attention layer "
            "(window 8192) and 3 Gated DeltaNet layers (16 heads, key dim 128, value dim 256).\n"
            "- Memory: a fixed-size cache (sliding window keys/values plus a 16x128x256 state per Gated DeltaNet layer), "
            "the same size after any input length."
        )
    text = config.get_text_config()
    vision = config.vision_config
    kinds = list(text.layer_types)
    n_swa, n_gdn = kinds.count("sliding_attention"), kinds.count("linear_attention")
    return (
        f"- Vision: Qwen2.5-VL vision tower ({vision.depth} blocks, width {vision.hidden_size}, patch {vision.patch_size}) "
        f"with a {vision.spatial_merge_size}x{vision.spatial_merge_size} patch merger into {vision.out_hidden_size}.\n"
        f"- Decoder: {len(kinds)} layers, hidden size {text.hidden_size}, vocabulary {text.vocab_size}: "
        f"{n_swa} sliding-window attention layers (window {text.sliding_window}, {text.num_attention_heads} query / "
        f"{text.num_key_value_heads} key-value heads) and {n_gdn} Gated DeltaNet layers "
        f"({text.num_linear_heads} heads).\n"
        f"- Layer order: {', '.join('SWA' if k == 'sliding_attention' else 'GDN' for k in kinds)}.\n"
        "- Memory: a fixed-size cache (sliding window keys/values plus one recurrent state per Gated DeltaNet layer)."
    )


def _defaults(kind: str, config) -> dict:
    info = {
        "repo_id": OFFICIAL_REPOS.get(kind, "path/to/checkpoint"),
        "transformers_version": "5.17",
        "architecture": architecture_summary(config),
        "sliding_window": config.get_text_config().sliding_window if config is not None else 8192,
        "stage2_repo": OFFICIAL_REPOS["infinitevl-4b"],
        "license": "apache-2.0",
        "title": "InfiniteVL checkpoint",
        "notes": "",
    }
    info["longsft_repo"] = f"https://huggingface.co/{OFFICIAL_REPOS['infinitevl-4b-longsft']}"
    return info


def render_model_card(kind: str, config=None, **info):
    """Render the template of `kind` and return a parsed, checked `huggingface_hub.ModelCard`.

    `info` fills placeholders (`repo_id`, `title`, `notes`, `license`, `base_model` for converted checkpoints, ...);
    `config` (an `InfiniteVLConfig`) fills the architecture section. Raises ValueError for an unknown kind,
    an unfilled placeholder or missing metadata.
    """
    from huggingface_hub import ModelCard

    template = template_text(kind)
    values = _defaults(kind, config)
    values.update({k: v for k, v in info.items() if v is not None})
    if "stage2_repo_url" not in values:
        values["stage2_repo_url"] = f"https://huggingface.co/{values['stage2_repo']}"
    missing = sorted({m for m in _PLACEHOLDER.findall(template) if m not in values})
    if missing:
        raise ValueError(f"The {kind!r} model card needs {', '.join(missing)}: pass them as keyword arguments.")
    content = _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), template)
    card = ModelCard(content, ignore_metadata_errors=False)
    check_model_card(card, kind)
    return card


def check_model_card(card, kind: str | None = None) -> None:
    """Offline checks of a parsed card's metadata (ModelCard.validate would call the Hub)."""
    data = card.data.to_dict()
    problems = [f"{key} is {data.get(key)!r}, expected {value!r}" for key, value in REQUIRED_METADATA.items()
                if data.get(key) != value]
    if not data.get("license"):
        problems.append("license is missing")
    if "infinitevl" not in (data.get("tags") or []):
        problems.append("the `infinitevl` tag is missing")
    if kind in ("infinitevl-4b", "infinitevl-4b-longsft", "converted") and not data.get("base_model"):
        problems.append("base_model is missing")
    if _PLACEHOLDER.search(card.content):
        problems.append(f"unfilled placeholder {_PLACEHOLDER.search(card.content).group(0)}")
    if problems:
        raise ValueError("Invalid model card: " + "; ".join(problems) + ".")


def write_model_card(folder: str | os.PathLike, kind: str = "checkpoint", config=None, overwrite: bool = False, **info) -> Path:
    """Render a card (see `render_model_card`) into `folder/README.md`; an existing README.md is kept unless `overwrite`."""
    path = Path(folder) / "README.md"
    if path.exists() and not overwrite:
        return path
    card = render_model_card(kind, config=config, **info)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(str(card), encoding="utf-8")
    return path


def save_pretrained_card_writer(folder, config) -> None:
    """The card `save_pretrained` writes into a folder without README.md (installed by `infinitevl_hf.export`)."""
    name = getattr(config, "name_or_path", "") or ""
    write_model_card(folder, "checkpoint", config=config, title=f"InfiniteVL checkpoint {Path(name).name}".strip())


__all__ = [
    "TEMPLATES",
    "architecture_summary",
    "check_model_card",
    "render_model_card",
    "save_pretrained_card_writer",
    "template_text",
    "write_model_card",
]
