"""Checkpoint loading rules: both key namings of the official release, and no silent random init."""

from __future__ import annotations

# transformers 4.5x wrote `visual.*` and `model.layers.*`; transformers 5 writes `model.visual.*` and
# `model.language_model.*`. Mapping the old names onto the new leaves new-style keys untouched.
LEGACY_KEY_MAPPING = {
    r"^visual\.": "model.visual.",
    r"^model\.(?!visual\.|language_model\.)": "model.language_model.",
}


def check_loading_info(model, info: dict, source, allow_missing: bool = False) -> None:
    """Raise when the checkpoint lacks tensors the model needs, holds tensors it does not know, or has wrong shapes.

    allow_missing: missing tensors are not a problem (they were initialised by `_init_weights`); for
    `from_pretrained(None, config=..., state_dict=...)`, where the caller hands over the weights it has."""
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(k for k in info.get("missing_keys", ()) if k not in tied)
    unexpected = sorted(info.get("unexpected_keys", ()))
    mismatched = sorted(info.get("mismatched_keys", ()))
    problems = []
    if missing and not allow_missing:
        problems.append(f"{len(missing)} missing tensors (would be randomly initialised), e.g. {missing[:5]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors, e.g. {unexpected[:5]}")
    if mismatched:
        problems.append(f"{len(mismatched)} tensors with the wrong shape, e.g. {[str(m) for m in mismatched[:5]]}")
    if problems:
        source = "The given state_dict" if source is None else f"Checkpoint {source}"
        raise ValueError(f"{source} does not match {type(model).__name__}: " + "; ".join(problems) + ".")
