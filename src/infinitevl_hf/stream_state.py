"""A streaming session's memory on disk: what `StreamingSession.save` writes and `load` reads back.

A state folder holds `session.json` (counters, settings, layer kinds, a config fingerprint, and the name of the
tensor file) and that tensor file (`state-HEX.safetensors`: cache tensors and waiting frames). The manifest is
written last, with one atomic replace (`staged.staged_files`): a folder always holds the old state or the new one,
and other files in it are never touched.

The cache's part is `InfiniteVLCache.state_dict()` as it is: its counters and layer records at the top of
`session.json` (`seen_tokens`, `padded_through`, `layers`), its tensors in the tensor file under their names. This
module adds the session's settings (`session`) and the waiting frames (tensors `pending.{i}`, [H, W, 3] uint8, with
`session.pending_timestamps`).

Everything is checked when a state is read, before it is used: a changed or damaged state (missing or extra
tensors, wrong shapes or dtypes, NaN/inf, negative or absurd counters, settings that would blow up memory) is
refused with a `ValueError` naming the field (the cache's part by `InfiniteVLCache.check_state_dict`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import uuid
from pathlib import Path

import numpy as np
import torch

from .modeling.cache import InfiniteVLCache
from .modeling.state_checks import check_count, check_tensor, refuse_extra
from .staged import staged_files

STATE_FORMAT = "infinitevl-stream-state"
STATE_VERSION = 1
STATE_TENSORS = "state.safetensors"  # the tensor file of states that name none
STATE_JSON = "session.json"

# Config fields that never change what a saved state means.
_FINGERPRINT_SKIP = {
    "_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures", "auto_map", "use_cache",
    "_attn_implementation", "_attn_implementation_autoset", "_experts_implementation", "output_attentions",
    "output_hidden_states", "return_dict", "prefill_chunk_tokens", "_commit_hash", "tie_word_embeddings",
    "chunk_size_feed_forward", "problem_type", "id2label", "label2id", "initializer_range",
}


# Tensor files a manifest may name: the fixed name of older states, or a fresh name per save.
_TENSOR_FILE = re.compile(r"^state(-[0-9a-f]{8})?\.safetensors$")
# Largest frame a setting may ask for (50 megapixels: about four 4K frames, 64K vision tokens each after merging).
MAX_FRAME_PIXELS = 50_000_000
# The manifest's top-level fields that belong to the cache (`InfiniteVLCache.state_dict()`), and the waiting frames'
# tensor names.
CACHE_FIELDS = ("seen_tokens", "padded_through", "layers")
PENDING = "pending."


def _clean(value):
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in sorted(value.items()) if k not in _FINGERPRINT_SKIP}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def config_fingerprint(config) -> str:
    """sha256 of the model config's fields that shape or give meaning to a cache (names, dtype, attention backend left out)."""
    blob = json.dumps(_clean(config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def config_summary(config) -> dict:
    text = config.get_text_config()
    fields = ("num_hidden_layers", "hidden_size", "layer_types", "sliding_window", "num_key_value_heads",
              "num_linear_heads", "linear_head_dim", "expand_v", "vocab_size")
    summary = {f"text.{name}": getattr(text, name, None) for name in fields}
    summary["vision.tokens_per_second"] = getattr(config.vision_config, "tokens_per_second", None)
    summary["vision.spatial_merge_size"] = getattr(config.vision_config, "spatial_merge_size", None)
    return summary


def summary_diff(saved: dict, current: dict) -> str:
    diffs = [f"{k}: saved {saved.get(k)!r}, model {current.get(k)!r}" for k in current if saved.get(k) != current.get(k)]
    return "; ".join(diffs[:4]) if diffs else "other fields differ"


# -- checks at load ----------------------------------------------------------------------------------------------
def _number(value, field: str, positive: bool = False, optional: bool = False) -> None:
    if value is None and optional:
        return
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (positive and value <= 0) or (not positive and value < 0):
        bound = "positive" if positive else "non-negative"
        raise ValueError(f"The saved state's {field} must be a finite {bound} number, got {value!r}.")


def check_settings(session: dict) -> None:
    """The saved session settings: counters, frame rate, chunking, pixel bounds (each refused by name)."""
    frames = check_count(session.get("frames"), "session.frames")
    check_count(session.get("chunks"), "session.chunks")
    _number(session.get("last_frame_ms"), "session.last_frame_ms", optional=True)
    last_time = session.get("last_time")
    if last_time is not None and (isinstance(last_time, bool) or not isinstance(last_time, (int, float)) or not math.isfinite(last_time)):
        raise ValueError(f"The saved state's session.last_time must be a finite time in seconds, got {last_time!r}.")
    check_count(session.get("frames_per_chunk"), "session.frames_per_chunk", low=1, high=4096)
    _number(session.get("fps"), "session.fps", positive=True)
    times = session.get("pending_timestamps")
    if not isinstance(times, list) or len(times) > frames:
        raise ValueError(f"The saved state's session.pending_timestamps must be a list of at most {frames} times.")
    for t in times:
        ok = not isinstance(t, bool) and isinstance(t, (int, float)) and math.isfinite(t)
        if not ok:
            raise ValueError(f"The saved state's session.pending_timestamps holds {t!r}, not a finite time.")
    for name in ("max_pixels", "min_pixels"):
        if session.get(name) is not None:
            check_count(session[name], f"session.{name}", low=1, high=MAX_FRAME_PIXELS)
    if session.get("min_pixels") and session.get("max_pixels") and session["min_pixels"] > session["max_pixels"]:
        raise ValueError(f"The saved state's session.min_pixels ({session['min_pixels']}) exceeds session.max_pixels "
                         f"({session['max_pixels']}).")
    template = session.get("question_template")
    if not isinstance(template, str) or "{question}" not in template:
        raise ValueError("The saved state's session.question_template must be a string containing '{question}'.")
    if session.get("system_prompt") is not None and not isinstance(session["system_prompt"], str):
        raise ValueError("The saved state's session.system_prompt must be a string.")


def cache_state(meta: dict, tensors: dict) -> dict:
    """The cache's part of a saved state (manifest `meta`, tensor file `tensors`), in `InfiniteVLCache.state_dict()`'s
    form: its counters and layer records and every tensor but the waiting frames."""
    state = {field: meta.get(field) for field in CACHE_FIELDS if field in meta}
    state["tensors"] = {name: tensor for name, tensor in tensors.items() if not name.startswith(PENDING)}
    return state


def check_session(meta: dict, tensors: dict) -> None:
    """The session's part of a saved state: its settings (`check_settings`) and one [H, W, 3] uint8 frame tensor per
    waiting timestamp, and no other `pending.*` tensor."""
    session = meta.get("session")
    if not isinstance(session, dict):
        raise ValueError("The saved state has no session settings (session.json: 'session').")
    check_settings(session)
    expected = set()
    for i in range(len(session["pending_timestamps"])):
        check_tensor(tensors, f"{PENDING}{i}", (None, None, 3), (torch.uint8,))
        expected.add(f"{PENDING}{i}")
    refuse_extra({name for name in tensors if name.startswith(PENDING)}, expected)


# -- reading and writing ----------------------------------------------------------------------------------------
def _manifest(path: Path) -> dict:
    meta = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
    if not isinstance(meta, dict):
        raise ValueError(f"{STATE_JSON} is not a JSON object")
    return meta


def tensor_file(meta: dict) -> str:
    """The tensor file a manifest names (a bare file name of this writer's pattern)."""
    name = meta.get("tensors", STATE_TENSORS)
    if not isinstance(name, str) or not _TENSOR_FILE.match(name):
        raise ValueError(f"The saved state's 'tensors' entry {name!r} is not a state tensor file name.")
    return name


def read_state(path: str | os.PathLike) -> tuple[dict, dict]:
    """(manifest, tensors) of the state folder `path`; format and version checked (the rest: `load_session_state`)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / STATE_JSON).is_file():
        raise FileNotFoundError(f"No saved stream state in {str(path)!r}: expected {STATE_JSON} and its tensor file.")
    try:
        meta = _manifest(path)
    except ValueError as error:
        raise ValueError(f"Cannot read the stream state in {str(path)!r}: {error}.") from error
    if meta.get("format") not in (STATE_FORMAT, None):
        raise ValueError(
            f"{str(path)!r} is not a version-{STATE_VERSION} InfiniteVL stream state "
            f"(format {meta.get('format')!r}, version {meta.get('version')!r})."
        )
    name = tensor_file(meta)
    if not (path / name).is_file():
        raise FileNotFoundError(f"No saved stream state in {str(path)!r}: {STATE_JSON} names {name}, which is missing.")
    try:
        tensors = load_file(str(path / name))
    except Exception as error:
        raise ValueError(f"Cannot read the stream state in {str(path)!r}: {error}.") from error
    if meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION:
        raise ValueError(
            f"{str(path)!r} is not a version-{STATE_VERSION} InfiniteVL stream state "
            f"(format {meta.get('format')!r}, version {meta.get('version')!r})."
        )
    return meta, tensors


def check_save_target(path: str | os.PathLike, overwrite: bool, flag: str = "overwrite=True") -> list[str]:
    """The files of the state already at `path` that a new save replaces; raises where a save must not go (naming
    `flag`, the option that allows replacing a saved state). Cheap: call it before long work that ends in a save."""
    path = Path(path).expanduser()
    if not path.exists():
        return []
    if not path.is_dir():
        raise FileExistsError(f"Refusing to save the stream state into {str(path)!r}: it is a file.")
    if not any(path.iterdir()):
        return []
    if not overwrite:
        raise FileExistsError(f"Refusing to save the stream state into {str(path)!r}: it exists (pass {flag} to replace it).")
    try:
        meta = _manifest(path)
        ours = meta.get("format") == STATE_FORMAT
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise FileExistsError(
            f"Refusing to save into {str(path)!r}: it is not a saved stream state (no {STATE_JSON} of ours), so "
            f"{flag} could overwrite files that are not ours."
        )
    # Every tensor file of ours goes: the current one and any a killed save left beside it (never named by a manifest).
    return [STATE_JSON, *sorted(p.name for p in path.iterdir() if _TENSOR_FILE.match(p.name))]


def write_state(path: str | os.PathLike, meta: dict, tensors: dict, overwrite: bool = False) -> Path:
    """Write a state folder: the tensors under a fresh name, then the manifest naming them (atomic replace), then
    the old state's tensor file is removed. Other files in `path` are never touched."""
    from safetensors.torch import save_file

    path = Path(path).expanduser()
    old = check_save_target(path, overwrite)
    name = f"state-{uuid.uuid4().hex[:8]}.safetensors"
    with staged_files(path, STATE_JSON, old_files=old) as stage:
        save_file(tensors, str(stage / name), metadata={"format": STATE_FORMAT})
        (stage / STATE_JSON).write_text(json.dumps({**meta, "tensors": name}, indent=1), encoding="utf-8")
    return path


# -- a session's state --------------------------------------------------------------------------------------------
def save_session_state(path: str | os.PathLike, config, cache: InfiniteVLCache, session: dict,
                       pending: list[tuple[np.ndarray, float]], overwrite: bool = False) -> Path:
    """Write a streaming session's state folder: `cache` (`state_dict()`: a static cache saves as its dynamic form),
    the `session` settings and counters, and the `pending` (frame, timestamp) pairs."""
    state = cache.state_dict()
    tensors = state.pop("tensors")
    for i, (array, _) in enumerate(pending):
        tensors[f"{PENDING}{i}"] = torch.from_numpy(np.ascontiguousarray(array))
    meta = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "fingerprint": config_fingerprint(config),
        "config": config_summary(config),
        **state,
        "session": {**session, "pending_timestamps": [t for _, t in pending]},
    }
    return write_state(path, meta, tensors, overwrite=overwrite)


def load_session_state(path: str | os.PathLike, config, device=None, dtype: torch.dtype | None = None
                       ) -> tuple[dict, InfiniteVLCache, list[tuple[np.ndarray, float]]]:
    """(session settings and counters, cache on `device` in `dtype`, pending (frame, timestamp) pairs) of the state
    folder `path`, read and checked whole against `config` first (fingerprint first: its message says which config
    field differs; then a ValueError names the changed or damaged field)."""
    meta, tensors = read_state(path)
    if meta.get("fingerprint") != config_fingerprint(config):
        diff = summary_diff(meta.get("config") or {}, config_summary(config))
        raise ValueError(
            f"The stream state in {str(path)!r} was saved from a different model config ({diff}); "
            "it can only be loaded into a model with that config."
        )
    try:
        check_session(meta, tensors)
        cache = InfiniteVLCache.from_state_dict(config, cache_state(meta, tensors), device=device, dtype=dtype)
    except ValueError as error:
        raise ValueError(f"The stream state in {str(path)!r} was changed or damaged: {error}") from error
    session = meta["session"]
    pending = [(tensors[f"{PENDING}{i}"].numpy().copy(), float(t)) for i, t in enumerate(session["pending_timestamps"])]
    return session, cache, pending


__all__ = ["STATE_FORMAT", "STATE_VERSION", "STATE_JSON", "MAX_FRAME_PIXELS", "config_fingerprint", "cache_state",
           "check_session", "check_settings", "check_save_target", "read_state", "write_state",
           "save_session_state", "load_session_state"]
