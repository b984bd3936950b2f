"""Key-name tables for porting a Qwen2.5-VL teacher checkpoint onto InfiniteVL, written as data.

A teacher checkpoint names its tensors in one of two ways:

- legacy (transformers 4.5x, and what transformers 5 still writes to disk): `visual.*`, `model.layers.*`,
  `model.embed_tokens.weight`, `model.norm.weight`, `lm_head.weight`;
- transformers 5 (in memory, and some re-saved checkpoints): `model.visual.*`, `model.language_model.*`.

`TEACHER_TO_CANONICAL` (the loader's own `LEGACY_KEY_MAPPING`) maps both onto the transformers-5 names,
which are also InfiniteVL's names. Each canonical name then falls under exactly one rule of `KEY_RULES`:

| rule        | what happens                                                                  |
|-------------|-------------------------------------------------------------------------------|
| `copy`      | vision tower, merger, embeddings, norms, MLPs, lm_head: copied bit for bit      |
| `attention` | q/k/v/o of layer i: copied when layer i stays attention, else read by the GDN init |

`CANONICAL_TO_LEGACY` is the reverse table (used by tests to write a legacy-named teacher, and to
check the round trip).
"""

from __future__ import annotations

import re

from ..modeling.loading import LEGACY_KEY_MAPPING

TEACHER_TO_CANONICAL: dict[str, str] = dict(LEGACY_KEY_MAPPING)

CANONICAL_TO_LEGACY: dict[str, str] = {
    r"^model\.visual\.": "visual.",
    r"^model\.language_model\.": "model.",
}

KEY_RULES: dict[str, tuple[str, ...]] = {
    "copy": (
        r"^model\.visual\..+$",
        r"^model\.language_model\.embed_tokens\.weight$",
        r"^model\.language_model\.norm\.weight$",
        r"^model\.language_model\.layers\.(?P<layer>\d+)\.(input_layernorm|post_attention_layernorm)\.weight$",
        r"^model\.language_model\.layers\.(?P<layer>\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$",
        r"^lm_head\.weight$",
    ),
    "attention": (
        r"^model\.language_model\.layers\.(?P<layer>\d+)\.self_attn\.(?P<proj>[qkvo])_proj\.(?P<kind>weight|bias)$",
    ),
}

EMBED_KEY = "model.language_model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"


def attention_key(layer: int, proj: str, kind: str = "weight") -> str:
    """Canonical name of a teacher attention tensor, e.g. `attention_key(3, "q")`."""
    return f"model.language_model.layers.{layer}.self_attn.{proj}_proj.{kind}"


def gdn_key(layer: int, param: str) -> str:
    """InfiniteVL name of a Gated DeltaNet tensor, e.g. `gdn_key(1, "q_conv1d.weight")`."""
    return f"model.language_model.layers.{layer}.self_attn.{param}"


def _apply(rules: dict[str, str], name: str) -> str:
    for pattern, replacement in rules.items():
        new, count = re.subn(pattern, replacement, name)
        if count:
            return new
    return name


def to_canonical(name: str) -> str:
    """Teacher tensor name (either naming) -> InfiniteVL / transformers-5 name."""
    return _apply(TEACHER_TO_CANONICAL, name)


def to_legacy(name: str) -> str:
    """InfiniteVL / transformers-5 name -> the legacy on-disk name (`visual.*`, `model.layers.*`)."""
    return _apply(CANONICAL_TO_LEGACY, name)


def classify(canonical: str) -> tuple[str, dict[str, str]] | None:
    """(rule, named groups) for a canonical name, or None when no rule knows it."""
    for rule, patterns in KEY_RULES.items():
        for pattern in patterns:
            match = re.match(pattern, canonical)
            if match:
                return rule, match.groupdict()
    return None


__all__ = [
    "CANONICAL_TO_LEGACY",
    "EMBED_KEY",
    "KEY_RULES",
    "LM_HEAD_KEY",
    "TEACHER_TO_CANONICAL",
    "attention_key",
    "classify",
    "gdn_key",
    "to_canonical",
    "to_legacy",
]
