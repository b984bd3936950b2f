"""A stream's memory cannot be lost or silently changed: interrupted feeds roll back, saves never leave neither
state, and a changed saved state is refused at load with the field named."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_streaming import QUESTION, assert_same_state, frames

from infinitevl_hf import StreamingSession
from infinitevl_hf.streaming import STATE_JSON


def _tensor_file(state) -> str:
    """The tensor file the state's manifest names."""
    return json.loads((state / STATE_JSON).read_text()).get("tensors", "state.safetensors")


class Interrupt(Exception):
    pass


def _break_layer(monkeypatch, model, index: int, error: type[BaseException]):
    """Make decoder layer `index` raise once, after the layers before it have written their state."""
    layer = model.model.language_model.layers[index]
    original = layer.forward
    calls = []

    def broken(*args, **kwargs):
        if not calls:
            calls.append(1)
            raise error("interrupted inside the decoder")
        return original(*args, **kwargs)

    monkeypatch.setattr(layer, "forward", broken)
    return calls


@pytest.mark.parametrize("error", [Interrupt, KeyboardInterrupt])
@pytest.mark.parametrize("call", ["add_frames", "add_text", "flush"])
def test_an_interrupted_feed_leaves_the_session_as_it_was(model, processor, monkeypatch, error, call):
    reference = StreamingSession(model, processor)
    session = StreamingSession(model, processor)
    for s in (reference, session):
        s.add_frames(frames(3))  # one frame waits
    before = session.cache.fork()
    stats = session.stats
    args = {"add_frames": (frames(3, seed=4),), "add_text": ("subtitle: a goal",), "flush": ()}[call]
    calls = _break_layer(monkeypatch, model, 3, error)  # layers 0-2 advance first
    with pytest.raises(error):
        getattr(session, call)(*args)
    assert calls == [1]
    assert_same_state(session.cache, before)
    assert session.stats == stats
    getattr(session, call)(*args)  # the retry feeds everything once
    getattr(reference, call)(*args)
    assert_same_state(session.cache, reference.cache)
    assert session.stats.as_dict() | {"last_frame_ms": 0} == reference.stats.as_dict() | {"last_frame_ms": 0}
    assert torch.equal(session.question_logits(QUESTION), reference.question_logits(QUESTION))


def test_a_save_that_fails_at_the_last_step_keeps_the_old_state(model, processor, tmp_path, monkeypatch):
    session = StreamingSession(model, processor)
    session.add_frames(frames(2))
    state = session.save(tmp_path / "state")
    old = StreamingSession.load(state, model, processor).cache
    session.add_frames(frames(2, seed=3))
    real = {"replace": os.replace, "rename": os.rename}

    def failing(name):
        def move(src, dst):  # the last step: publishing the new state, whatever the mechanism
            if os.path.abspath(dst) in (str(state), str(state / STATE_JSON)):
                raise OSError(28, "No space left on device")
            return real[name](src, dst)
        return move

    with monkeypatch.context() as m:
        m.setattr(os, "replace", failing("replace"))
        m.setattr(os, "rename", failing("rename"))
        with pytest.raises(OSError, match="No space left"):
            session.save(state, overwrite=True)
    assert_same_state(StreamingSession.load(state, model, processor).cache, old)
    assert sorted(p.name for p in state.iterdir()) == sorted([STATE_JSON, _tensor_file(state)])
    (state / "state-0123abcd.safetensors").write_bytes(b"a killed save's tensors")  # never named by a manifest
    session.save(state, overwrite=True)
    assert_same_state(StreamingSession.load(state, model, processor).cache, session.cache)
    assert sorted(p.name for p in state.iterdir()) == sorted([STATE_JSON, _tensor_file(state)])


def test_a_save_touches_only_its_own_files(model, processor, tmp_path):
    session = StreamingSession(model, processor)
    session.add_frames(frames(2))
    state = session.save(tmp_path / "state")
    (state / "notes.txt").write_text("my notes")
    (state / "clip.mp4").write_bytes(b"video")
    session.add_frames(frames(2, seed=1))
    session.save(state, overwrite=True)
    names = sorted(p.name for p in state.iterdir())
    assert names == sorted(["notes.txt", "clip.mp4", STATE_JSON, _tensor_file(state)])
    assert (state / "notes.txt").read_text() == "my notes" and (state / "clip.mp4").read_bytes() == b"video"
    assert state.stat().st_mode & 0o777 == 0o755
    assert_same_state(StreamingSession.load(state, model, processor).cache, session.cache)


def _tamper(state, tensors=None, meta=None):
    manifest = json.loads((state / STATE_JSON).read_text())
    name = _tensor_file(state)
    if tensors is not None:
        data = load_file(state / name)
        tensors(data)
        save_file(data, str(state / name))
    if meta is not None:
        meta(manifest)
        (state / STATE_JSON).write_text(json.dumps(manifest))


def _set(path, value):
    def apply(d):
        *head, last = path
        for key in head:
            d = d[key]
        d[last] = value
    return apply


CHANGES = {
    "missing tensor": (dict(tensors=lambda t: t.pop("layers.1.recurrent.0")), "lacks tensor 'layers.1.recurrent.0'"),
    "wrong shape": (dict(tensors=lambda t: t.__setitem__("layers.0.keys", t["layers.0.keys"][:, :1])),
                    r"'layers.0.keys' has shape \[1, 1, "),
    "wrong dtype": (dict(tensors=lambda t: t.__setitem__("layers.3.recurrent.0", t["layers.3.recurrent.0"].double())),
                    "'layers.3.recurrent.0' is torch.float64"),
    "nan": (dict(tensors=lambda t: t["layers.1.conv.2"].view(-1).__setitem__(0, float("nan"))), "'layers.1.conv.2' holds NaN"),
    "inf": (dict(tensors=lambda t: t["layers.0.values"].view(-1).__setitem__(3, float("inf"))), "'layers.0.values' holds NaN or inf"),
    "extra tensor": (dict(tensors=lambda t: t.__setitem__("layers.9.keys", torch.zeros(1))), "does not have: \\['layers.9.keys'\\]"),
    "negative counter": (dict(meta=_set(["seen_tokens"], -5)), "seen_tokens must be a whole number"),
    "absurd counter": (dict(meta=_set(["session", "frames"], 10**30)), "session.frames must be a whole number"),
    "fractional counter": (dict(meta=_set(["layers", 0, "cumulative_length"], 2.5)), r"layers\[0\].cumulative_length"),
    "min_pixels": (dict(meta=_set(["session", "min_pixels"], 10**11)), "session.min_pixels must be a whole number"),
    "fps": (dict(meta=_set(["session", "fps"], float("nan"))), "session.fps must be a finite positive"),
    "window overflow": (dict(tensors=lambda t: [t.__setitem__(k, torch.cat([t[k]] * 3, dim=2)) for k in ("layers.0.keys", "layers.0.values")]),
                        "'layers.0.keys' holds 45 tokens"),
    "tensor file": (dict(meta=_set(["tensors"], "../../elsewhere.safetensors")), "'tensors' entry"),
    "missing frame": (dict(tensors=lambda t: t.pop("pending.0")), "lacks tensor 'pending.0'"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_changed_state_is_refused_at_load_naming_the_field(model, processor, tmp_path, change):
    session = StreamingSession(model, processor)
    session.add_frames(frames(9))  # a full window (16 tokens), one frame waiting
    state = session.save(tmp_path / "state")
    kwargs, match = CHANGES[change]
    _tamper(state, **kwargs)
    with pytest.raises(ValueError, match=match):
        StreamingSession.load(state, model, processor)
    before = session.cache.fork()
    with pytest.raises(ValueError, match=match):
        session.load_state(state)
    assert_same_state(session.cache, before)


def test_constructor_refuses_absurd_pixel_bounds(model, processor):
    with pytest.raises(ValueError, match="min_pixels"):
        StreamingSession(model, processor, min_pixels=10**11)
    with pytest.raises(ValueError, match="max_pixels"):
        StreamingSession(model, processor, max_pixels=0)


def test_waiting_frames_round_trip(model, processor, tmp_path):
    session = StreamingSession(model, processor)
    session.add_frames(frames(3))
    resumed = StreamingSession.load(session.save(tmp_path / "s"), model, processor)
    assert len(resumed._buffer.pending) == 1 and np.array_equal(resumed._buffer.pending[0][0], session._buffer.pending[0][0])
