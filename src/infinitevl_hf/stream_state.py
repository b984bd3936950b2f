"""A streaming session's memory on disk: what `StreamingSession.save` writes and `load` reads back.

A state folder holds `session.json` (counters, settings, layer kinds, a config fingerprint, and the name of the
tensor file) and that tensor file (`state-HEX.safetensors`: cache tensors and waiting frames). The manifest is
written last, with one atomic replace (`staged.staged_files`): a folder always holds the old state or the new one,
and other files in it are never touched.

Everything is checked when a state is read, before it is used: a changed or damaged state (missing or extra
tensors, wrong shapes or dtypes, NaN/inf, negative or absurd counters, settings that would blow up memory) is
refused with a `ValueError` naming the field.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import uuid
from pathlib import Path

import torch

from .modeling.cache import InfiniteVLAttentionLayer, InfiniteVLCache, InfiniteVLLinearAttentionLayer
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
# Largest counter a real stream reaches (2**53: exact in JSON and float64) and largest frame a setting may ask for
# (50 megapixels: about four 4K frames, 64K vision tokens each after merging).
MAX_COUNT = 2**53
MAX_FRAME_PIXELS = 50_000_000


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


def cache_to_tensors(cache: InfiniteVLCache) -> tuple[dict, list]:
    tensors, layers = {}, []
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, InfiniteVLAttentionLayer):
            info = {"kind": "attention", "cumulative_length": layer.cumulative_length, "initialized": layer.is_initialized}
            if layer.is_initialized:
                tensors[f"layers.{i}.keys"] = layer.keys.detach().contiguous().cpu()
                tensors[f"layers.{i}.values"] = layer.values.detach().contiguous().cpu()
                if layer.valid is not None:
                    tensors[f"layers.{i}.valid"] = layer.valid.detach().contiguous().cpu()
        elif isinstance(layer, InfiniteVLLinearAttentionLayer):
            info = {"kind": "linear_attention", "has_previous_state": [bool(layer.has_previous_state[j]) for j in range(layer.number_of_states)]}
            for j in range(layer.number_of_states):
                if layer.conv_states[j] is not None:
                    tensors[f"layers.{i}.conv.{j}"] = layer.conv_states[j].detach().contiguous().cpu()
                if layer.recurrent_states[j] is not None:
                    tensors[f"layers.{i}.recurrent.{j}"] = layer.recurrent_states[j].detach().contiguous().cpu()
        else:
            raise ValueError(f"Cache layer {i} ({type(layer).__name__}) cannot be saved.")
        layers.append(info)
    if cache.next_positions is not None:
        tensors["next_positions"] = cache.next_positions.detach().contiguous().cpu()
    return tensors, layers


def cache_from_tensors(config, tensors: dict, meta: dict, device, dtype: torch.dtype) -> InfiniteVLCache:
    """Rebuild a cache on `device`; keys, values and conv states take the model's `dtype` (a state saved from a
    bf16 model resumes in an fp32 one without mixing precisions); recurrent states stay float32."""
    cache = InfiniteVLCache(config)
    if len(meta["layers"]) != len(cache.layers):
        raise ValueError(f"The saved state has {len(meta['layers'])} layers, the model {len(cache.layers)}.")
    for i, (layer, info) in enumerate(zip(cache.layers, meta["layers"])):
        if isinstance(layer, InfiniteVLAttentionLayer):
            if info["kind"] != "attention":
                raise ValueError(f"Saved layer {i} is {info['kind']}, the model's is attention.")
            layer.cumulative_length = int(info["cumulative_length"])
            if info["initialized"]:
                keys = tensors[f"layers.{i}.keys"].to(device, dtype)
                values = tensors[f"layers.{i}.values"].to(device, dtype)
                layer.lazy_initialization(keys, values)
                layer.keys, layer.values = keys, values
                layer.dtype = keys.dtype
                valid = tensors.get(f"layers.{i}.valid")
                layer.valid = None if valid is None else valid.to(device)
        else:
            if info["kind"] != "linear_attention":
                raise ValueError(f"Saved layer {i} is {info['kind']}, the model's is linear_attention.")
            for j in range(layer.number_of_states):
                conv, recurrent = tensors.get(f"layers.{i}.conv.{j}"), tensors.get(f"layers.{i}.recurrent.{j}")
                if conv is not None:
                    layer.update_conv_state(conv.to(device, dtype), state_idx=j)
                if recurrent is not None:
                    layer.update_recurrent_state(recurrent.to(device), state_idx=j)
                layer.has_previous_state[j] = bool(info["has_previous_state"][j])
    cache.seen_tokens = int(meta["seen_tokens"])
    cache.padded_through = int(meta.get("padded_through", cache.seen_tokens))  # (unknown: as if just padded)
    positions = tensors.get("next_positions")
    cache.next_positions = None if positions is None else positions.to(device)
    return cache


# -- checks at load ----------------------------------------------------------------------------------------------
def _count(value, field: str, low: int = 0, high: int = MAX_COUNT) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"The saved state's {field} must be a whole number in [{low}, {high}], got {value!r}.")
    return value


def _number(value, field: str, positive: bool = False, optional: bool = False) -> None:
    if value is None and optional:
        return
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (positive and value <= 0) or (not positive and value < 0):
        bound = "positive" if positive else "non-negative"
        raise ValueError(f"The saved state's {field} must be a finite {bound} number, got {value!r}.")


def _tensor(tensors: dict, name: str, shape: tuple, dtypes: tuple, finite: bool = True) -> torch.Tensor:
    if name not in tensors:
        raise ValueError(f"The saved state lacks tensor {name!r}.")
    tensor = tensors[name]
    if tensor.dtype not in dtypes:
        raise ValueError(f"The saved state's tensor {name!r} is {tensor.dtype}, expected {' or '.join(map(str, dtypes))}.")
    if tensor.dim() != len(shape) or any(want is not None and got != want for got, want in zip(tensor.shape, shape)):
        want = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
        raise ValueError(f"The saved state's tensor {name!r} has shape {list(tensor.shape)}, expected {want}.")
    if finite and tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise ValueError(f"The saved state's tensor {name!r} holds NaN or inf.")
    return tensor


_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_settings(session: dict) -> None:
    """The saved session settings: counters, frame rate, chunking, pixel bounds (each refused by name)."""
    frames = _count(session.get("frames"), "session.frames")
    _count(session.get("chunks"), "session.chunks")
    _number(session.get("last_frame_ms"), "session.last_frame_ms", optional=True)
    last_time = session.get("last_time")
    if last_time is not None and (isinstance(last_time, bool) or not isinstance(last_time, (int, float)) or not math.isfinite(last_time)):
        raise ValueError(f"The saved state's session.last_time must be a finite time in seconds, got {last_time!r}.")
    _count(session.get("frames_per_chunk"), "session.frames_per_chunk", low=1, high=4096)
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
            _count(session[name], f"session.{name}", low=1, high=MAX_FRAME_PIXELS)
    if session.get("min_pixels") and session.get("max_pixels") and session["min_pixels"] > session["max_pixels"]:
        raise ValueError(f"The saved state's session.min_pixels ({session['min_pixels']}) exceeds session.max_pixels "
                         f"({session['max_pixels']}).")
    template = session.get("question_template")
    if not isinstance(template, str) or "{question}" not in template:
        raise ValueError("The saved state's session.question_template must be a string containing '{question}'.")
    if session.get("system_prompt") is not None and not isinstance(session["system_prompt"], str):
        raise ValueError("The saved state's session.system_prompt must be a string.")


def check_state(config, meta: dict, tensors: dict) -> None:
    """Check a saved state against the model `config` before anything uses it: every counter, every tensor's
    presence, shape, dtype and values, and nothing extra. Raises `ValueError` naming the field."""
    session = meta.get("session")
    if not isinstance(session, dict):
        raise ValueError("The saved state has no session settings (session.json: 'session').")
    check_settings(session)
    seen = _count(meta.get("seen_tokens"), "seen_tokens")
    _count(meta.get("padded_through", seen), "padded_through", high=seen)
    text = config.get_text_config()
    layers = meta.get("layers")
    if not isinstance(layers, list) or len(layers) != len(text.layer_types):
        count = len(layers) if isinstance(layers, list) else layers
        raise ValueError(f"The saved state has {count} layers, the model {len(text.layer_types)}.")
    batch = tensors["next_positions"].shape[0] if "next_positions" in tensors and tensors["next_positions"].dim() == 1 else None
    expected = set()
    if seen:
        positions = _tensor(tensors, "next_positions", (batch,), (torch.int64,))
        if (positions < 0).any() or (positions > MAX_COUNT).any():
            raise ValueError("The saved state's tensor 'next_positions' holds negative or absurd positions.")
        expected.add("next_positions")
    head_dim = text.hidden_size // text.num_attention_heads
    key_dim, value_dim = text.num_linear_heads * text.linear_head_dim, text.num_linear_heads * text.linear_value_head_dim
    for i, (kind, info) in enumerate(zip(text.layer_types, layers)):
        if not isinstance(info, dict):
            raise ValueError(f"The saved state's layers[{i}] is not a layer record.")
        if kind != "linear_attention":
            if info.get("kind") != "attention":
                raise ValueError(f"Saved layer {i} is {info.get('kind')}, the model's is attention.")
            cumulative = _count(info.get("cumulative_length"), f"layers[{i}].cumulative_length", high=seen)
            if not isinstance(info.get("initialized"), bool):
                raise ValueError(f"The saved state's layers[{i}].initialized must be true or false.")
            if not info["initialized"]:
                continue
            window = text.window_for_layer(i)
            keys = _tensor(tensors, f"layers.{i}.keys", (batch, text.num_key_value_heads, None, head_dim), _FLOATS)
            length = keys.shape[2]
            if length > cumulative or (window is not None and length > window - 1):
                raise ValueError(f"The saved state's tensor 'layers.{i}.keys' holds {length} tokens; layer {i} keeps at "
                                 f"most {min(cumulative, (window or cumulative + 1) - 1)}.")
            _tensor(tensors, f"layers.{i}.values", tuple(keys.shape), _FLOATS)
            expected |= {f"layers.{i}.keys", f"layers.{i}.values"}
            if f"layers.{i}.valid" in tensors:
                _tensor(tensors, f"layers.{i}.valid", (batch, length), (torch.bool,))
                expected.add(f"layers.{i}.valid")
        else:
            if info.get("kind") != "linear_attention":
                raise ValueError(f"Saved layer {i} is {info.get('kind')}, the model's is linear_attention.")
            flags = info.get("has_previous_state")
            if not isinstance(flags, list) or len(flags) != 3 or not all(isinstance(f, bool) for f in flags):
                raise ValueError(f"The saved state's layers[{i}].has_previous_state must be three true/false flags.")
            if not seen:
                continue
            if text.use_short_conv:
                for j, channels in enumerate((key_dim, key_dim, value_dim)):
                    _tensor(tensors, f"layers.{i}.conv.{j}", (batch, channels, text.conv_size - 1), _FLOATS)
                    expected.add(f"layers.{i}.conv.{j}")
            shape = (batch, text.num_linear_heads, text.linear_head_dim, text.linear_value_head_dim)
            _tensor(tensors, f"layers.{i}.recurrent.0", shape, (torch.float32,))
            expected.add(f"layers.{i}.recurrent.0")
    for i in range(len(session["pending_timestamps"])):
        _tensor(tensors, f"pending.{i}", (None, None, 3), (torch.uint8,))
        expected.add(f"pending.{i}")
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ValueError(f"The saved state holds tensors this model's state does not have: {extra[:5]}.")


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
    """(manifest, tensors) of the state folder `path`; format and version checked (the rest: `check_state`)."""
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


__all__ = ["STATE_FORMAT", "STATE_VERSION", "STATE_JSON", "MAX_FRAME_PIXELS", "config_fingerprint", "check_state",
           "check_settings", "check_save_target", "read_state", "write_state", "cache_to_tensors", "cache_from_tensors"]
