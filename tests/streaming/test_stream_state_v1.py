"""The on-disk stream state stays version 1: folders written by the version-1 writer load, and a save writes what
that writer wrote. `_v1_state` is a frozen copy of that writer (StreamingSession.save before the cache owned its
state), so these tests do not depend on `InfiniteVLCache.state_dict`."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_streaming import QUESTION, assert_same_state, frames

from infinitevl_hf import StreamingSession
from infinitevl_hf.modeling.cache import InfiniteVLAttentionLayer, InfiniteVLLinearAttentionLayer
from infinitevl_hf.stream_state import STATE_JSON, config_fingerprint, config_summary


def _v1_state(session) -> tuple[dict, dict]:
    """(manifest, tensors) as the version-1 writer laid them out."""
    cache = session.cache.fork().to_dynamic() if session.cache.is_static else session.cache
    tensors, layers = {}, []
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, InfiniteVLAttentionLayer):
            info = {"kind": "attention", "cumulative_length": layer.cumulative_length, "initialized": layer.is_initialized}
            if layer.is_initialized:
                tensors[f"layers.{i}.keys"] = layer.keys.detach().contiguous().cpu()
                tensors[f"layers.{i}.values"] = layer.values.detach().contiguous().cpu()
                if layer.valid is not None:
                    tensors[f"layers.{i}.valid"] = layer.valid.detach().contiguous().cpu()
        else:
            assert isinstance(layer, InfiniteVLLinearAttentionLayer)
            info = {"kind": "linear_attention", "has_previous_state": [bool(layer.has_previous_state[j]) for j in range(3)]}
            for j in range(3):
                if layer.conv_states[j] is not None:
                    tensors[f"layers.{i}.conv.{j}"] = layer.conv_states[j].detach().contiguous().cpu()
                if layer.recurrent_states[j] is not None:
                    tensors[f"layers.{i}.recurrent.{j}"] = layer.recurrent_states[j].detach().contiguous().cpu()
        layers.append(info)
    if cache.next_positions is not None:
        tensors["next_positions"] = cache.next_positions.detach().contiguous().cpu()
    pending = session._buffer.pending
    for i, (array, _) in enumerate(pending):
        tensors[f"pending.{i}"] = torch.from_numpy(np.ascontiguousarray(array))
    stats = session.stats
    meta = {
        "format": "infinitevl-stream-state",
        "version": 1,
        "fingerprint": config_fingerprint(session.model.config),
        "config": config_summary(session.model.config),
        "seen_tokens": cache.seen_tokens,
        "padded_through": cache.padded_through,
        "layers": layers,
        "session": {
            "frames": stats.frames,
            "chunks": stats.chunks,
            "last_frame_ms": stats.last_frame_ms,
            "last_time": session._buffer.last_time,
            "pending_timestamps": [t for _, t in pending],
            "frames_per_chunk": session.frames_per_chunk,
            "fps": session.fps,
            "system_prompt": session.system_prompt,
            "question_template": session.question_template,
            "max_pixels": session.max_pixels,
            "min_pixels": session.min_pixels,
        },
    }
    return meta, tensors


def _streamed(model, processor, static: bool) -> StreamingSession:
    session = StreamingSession(model, processor, system_prompt="You watch videos.")
    session.add_frames(frames(2))
    if static:
        session.cache.to_static()  # what the CUDA-graph path streams on
    session.add_frames(frames(9, seed=3))  # several windows; one frame waits
    session.add_text("Subtitle: a cat.")
    session.add_frames(frames(1, seed=5))
    return session


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_a_version_1_folder_loads_as_the_session_it_was_written_from(model, processor, tmp_path, static):
    session = _streamed(model, processor, static)
    meta, tensors = _v1_state(session)
    (tmp_path / "v1").mkdir()
    save_file(tensors, str(tmp_path / "v1" / "state.safetensors"))  # the fixed tensor file name of early states
    (tmp_path / "v1" / STATE_JSON).write_text(json.dumps(meta, indent=1))
    resumed = StreamingSession.load(tmp_path / "v1", model, processor)
    expected = session.cache.fork().to_dynamic()
    assert_same_state(resumed.cache, expected)
    assert resumed.cache.padded_through == expected.padded_through
    assert resumed.stats == replace(session.stats, cache_bytes=expected.nbytes)  # (a ring holds one slot more)
    assert resumed.clock == session.clock
    assert len(resumed._buffer.pending) == 1
    assert np.array_equal(resumed._buffer.pending[0][0], session._buffer.pending[0][0])
    assert resumed._buffer.pending[0][1] == session._buffer.pending[0][1]
    # (a static session reads its question through the rings: the same attention, summed in another order)
    tolerance = dict(rtol=1e-5, atol=1e-6) if static else dict(rtol=0, atol=0)
    torch.testing.assert_close(resumed.question_logits(QUESTION), session.question_logits(QUESTION), **tolerance)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_a_save_writes_what_the_version_1_writer_wrote(model, processor, tmp_path, static):
    session = _streamed(model, processor, static)
    state = session.save(tmp_path / "state")
    meta = json.loads((state / STATE_JSON).read_text())
    tensors = load_file(str(state / meta.pop("tensors")))
    want_meta, want_tensors = _v1_state(session)
    assert meta == json.loads(json.dumps(want_meta))
    assert sorted(tensors) == sorted(want_tensors)
    for name, tensor in want_tensors.items():
        assert tensors[name].dtype == tensor.dtype and torch.equal(tensors[name], tensor), name
    assert session.cache.is_static == static  # saving leaves a static cache static
