"""InfiniteVLCache.state_dict / from_state_dict: a round trip continues exactly, and a changed state is refused
with the field named."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from helpers import image_inputs, tiny_config, tiny_model
from infinitevl_hf import InfiniteVLCache
from infinitevl_hf.modeling.compat import CACHE_KWARG

PAD = 7  # a pad id with a real embedding: only the mask keeps it out


@pytest.fixture(scope="module")
def model():
    """Window 8: the prompt below spans several windows, and its padding has left them."""
    return tiny_model()


@pytest.fixture(scope="module", params=["several windows", "padding in the window"])
def any_model(request, model):
    """Both the window-8 model and one with window 32, whose windows still hold the prompt's padding."""
    return model if request.param == "several windows" else tiny_model(sliding_window=32)


def _padded_image_batch():
    """Two rows, each with an image; the second left-padded by 3 tokens. [2, 19] ids, mask, pixels, grids."""
    ids_a, pixels_a, grid_a = image_inputs(prefix=5, suffix=8, seed=2)
    ids_b, pixels_b, grid_b = image_inputs(prefix=2, suffix=8, seed=3)
    ids = torch.cat([ids_a, torch.cat([torch.full((1, 3), PAD), ids_b], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask, torch.cat([pixels_a, pixels_b]), torch.cat([grid_a, grid_b])


def _prompted(model, static: bool):
    """A cache after a padded image prompt (more than two windows) and a few decode steps; with `static`, the
    decode steps ran on the rings. Returns (cache, attention mask so far, next token [2, 1])."""
    ids, mask, pixels, grid = _padded_image_batch()
    cache = InfiniteVLCache(model.config)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                       use_cache=True, **{CACHE_KWARG: cache}).logits
        if static:
            cache.to_static()
        token = logits[:, -1:].argmax(-1)
        for _ in range(3):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
            token = model(input_ids=token, attention_mask=mask, use_cache=True, **{CACHE_KWARG: cache}).logits.argmax(-1)
    assert cache.is_static == static
    return cache, mask, token


def _continue(model, cache, mask, token, steps: int = 12):
    """Greedy decode `steps` tokens (longer than the window) from `cache`: (first step's logits, tokens [2, steps])."""
    tokens, first = [], None
    with torch.no_grad():
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
            logits = model(input_ids=token, attention_mask=mask, use_cache=True, **{CACHE_KWARG: cache}).logits
            first = logits if first is None else first
            token = logits.argmax(-1)
            tokens.append(token)
    return first, torch.cat(tokens, dim=1)


def test_a_dynamic_cache_round_trip_continues_identically(any_model):
    """state_dict -> from_state_dict of a cache after a padded image prompt gives the same next-token logits and
    the same greedy continuation, bit for bit."""
    cache, mask, token = _prompted(any_model, static=False)
    state = cache.state_dict()
    window = any_model.config.text_config.sliding_window
    padding_kept = cache.seen_tokens - (window - 1) <= 2  # the window's oldest token is at most the last pad (2)
    assert bool(state["tensors"]["layers.0.valid"].all()) != padding_kept
    restored = InfiniteVLCache.from_state_dict(any_model.config, state)
    assert restored.seen_tokens == cache.seen_tokens and restored.padded_through == cache.padded_through
    logits, tokens = _continue(any_model, restored, mask, token)
    want_logits, want_tokens = _continue(any_model, cache, mask, token)
    assert torch.equal(logits, want_logits)
    assert torch.equal(tokens, want_tokens)


def test_a_static_cache_saves_as_its_dynamic_equivalent(any_model):
    """A ring cache's state is that of `to_dynamic()`: it restores as a dynamic cache that continues like it, and
    taking the state leaves the cache static."""
    cache, mask, token = _prompted(any_model, static=True)
    state = cache.state_dict()
    assert cache.is_static
    restored = InfiniteVLCache.from_state_dict(any_model.config, state)
    assert not restored.is_static
    dynamic = cache.fork().to_dynamic()
    logits, tokens = _continue(any_model, restored, mask, token)
    want_logits, want_tokens = _continue(any_model, dynamic, mask, token)
    assert torch.equal(logits, want_logits)
    assert torch.equal(tokens, want_tokens)
    ring_logits, ring_tokens = _continue(any_model, cache, mask, token)  # the rings themselves: the same attention
    torch.testing.assert_close(logits, ring_logits, rtol=1e-5, atol=1e-6)
    assert torch.equal(tokens, ring_tokens)


def test_a_restored_cache_turns_static_and_continues_like_the_rings(any_model):
    cache, mask, token = _prompted(any_model, static=True)
    restored = InfiniteVLCache.from_state_dict(any_model.config, cache.state_dict()).to_static()
    logits, tokens = _continue(any_model, restored, mask, token)
    want_logits, want_tokens = _continue(any_model, cache, mask, token)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-6)
    assert torch.equal(tokens, want_tokens)


def test_a_state_shares_no_memory_with_either_cache(any_model):
    """Feeding the cache a state came from, or a cache restored from it, leaves the state as it was."""
    cache, mask, token = _prompted(any_model, static=False)
    state = cache.state_dict()
    before = {name: tensor.clone() for name, tensor in state["tensors"].items()}
    restored = InfiniteVLCache.from_state_dict(any_model.config, state)
    _continue(any_model, cache, mask, token, steps=2)
    _continue(any_model, restored, mask, token, steps=2)
    assert state["tensors"].keys() == before.keys()
    assert all(torch.equal(state["tensors"][name], tensor) for name, tensor in before.items())


def test_the_state_holds_plain_counters_records_and_cpu_tensors(model):
    cache, _, _ = _prompted(model, static=False)
    state = cache.state_dict()
    meta = {key: value for key, value in state.items() if key != "tensors"}
    assert json.loads(json.dumps(meta)) == meta  # what a saved stream's session.json holds
    assert [record["kind"] for record in state["layers"]] == [
        "linear_attention" if kind == "linear_attention" else "attention" for kind in cache.layer_types
    ]
    tensors = state["tensors"]
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in tensors.values())
    assert tensors["layers.0.valid"].dtype == torch.bool  # padding was seen (it has left the window since)
    assert tensors["next_positions"].dtype == torch.int64 and tensors["layers.1.recurrent.0"].dtype == torch.float32


def test_a_state_restores_in_the_dtype_asked_for(model):
    cache, _, _ = _prompted(model, static=False)
    restored = InfiniteVLCache.from_state_dict(model.config, cache.state_dict(), device="cpu", dtype=torch.bfloat16)
    assert restored.layers[0].keys.dtype == restored.layers[0].values.dtype == torch.bfloat16
    assert restored.layers[1].conv_states[0].dtype == torch.bfloat16
    assert restored.layers[1].recurrent_states[0].dtype == torch.float32  # the recurrent state stays fp32
    assert restored.layers[0].valid.dtype == torch.bool and restored.next_positions.dtype == torch.int64


def test_an_empty_cache_round_trips(model):
    state = InfiniteVLCache(model.config).state_dict()
    assert state["tensors"] == {} and state["seen_tokens"] == 0
    restored = InfiniteVLCache.from_state_dict(model.config, state)
    assert restored.seen_tokens == 0 and restored.next_positions is None and restored.nbytes == 0


# -- a changed state is refused, naming the field ------------------------------------------------------------------
def _nan(name, index=0, value=float("nan")):
    def change(state):
        state["tensors"][name].view(-1)[index] = value
    return change


def _set(path, value):
    def change(state):
        *head, last = path
        target = state
        for key in head:
            target = target[key]
        target[last] = value
    return change


def _tensor(name, make):
    def change(state):
        state["tensors"][name] = make(state["tensors"][name])
    return change


CHANGES = {
    "missing tensor": (lambda s: s["tensors"].pop("layers.1.recurrent.0"), "lacks tensor 'layers.1.recurrent.0'"),
    "missing positions": (lambda s: s["tensors"].pop("next_positions"), "lacks tensor 'next_positions'"),
    "extra tensor": (lambda s: s["tensors"].__setitem__("layers.9.keys", torch.zeros(1)),
                     r"does not have: \['layers.9.keys'\]"),
    "extra state index": (lambda s: s["tensors"].__setitem__("layers.1.recurrent.1", torch.zeros(1)),
                          r"does not have: \['layers.1.recurrent.1'\]"),
    "wrong shape": (_tensor("layers.0.keys", lambda t: t[:, :1]), r"'layers.0.keys' has shape \[2, 1, "),
    "wrong batch": (_tensor("layers.2.conv.1", lambda t: t[:1]), r"'layers.2.conv.1' has shape \[1, "),
    "values unlike keys": (_tensor("layers.4.values", lambda t: t[..., :-1]), "'layers.4.values' has shape"),
    "window overflow": (_tensor("layers.0.keys", lambda t: torch.cat([t] * 3, dim=2)), "'layers.0.keys' holds 21 tokens"),
    "wrong dtype": (_tensor("layers.3.recurrent.0", lambda t: t.double()), "'layers.3.recurrent.0' is torch.float64"),
    "wrong flag dtype": (_tensor("layers.0.valid", lambda t: t.to(torch.uint8)), "'layers.0.valid' is torch.uint8"),
    "wrong position dtype": (_tensor("next_positions", lambda t: t.int()), "'next_positions' is torch.int32"),
    "nan": (_nan("layers.1.conv.2"), "'layers.1.conv.2' holds NaN"),
    "inf": (_nan("layers.0.values", 3, float("inf")), "'layers.0.values' holds NaN or inf"),
    "not a tensor": (lambda s: s["tensors"].__setitem__("layers.3.recurrent.0", [0.0]), "'layers.3.recurrent.0' is a list"),
    "attention saved as linear": (_set(["layers", 0, "kind"], "linear_attention"),
                                  "Saved layer 0 is linear_attention, the model's is attention"),
    "linear saved as attention": (_set(["layers", 1, "kind"], "attention"),
                                  "Saved layer 1 is attention, the model's is linear_attention"),
    "layer count": (lambda s: s["layers"].pop(), "has 4 layers, the model 5"),
    "layer record": (_set(["layers", 2], "linear_attention"), r"layers\[2\] is not a layer record"),
    "negative counter": (_set(["seen_tokens"], -5), "seen_tokens must be a whole number"),
    "fractional counter": (_set(["layers", 0, "cumulative_length"], 2.5), r"layers\[0\].cumulative_length"),
    "negative layer counter": (_set(["layers", 4, "cumulative_length"], -1), r"layers\[4\].cumulative_length"),
    "padded past the end": (_set(["padded_through"], 10**6), "padded_through must be a whole number"),
    "negative position": (_nan("next_positions", 1, -1), "'next_positions' holds negative"),
    "initialized flag": (_set(["layers", 0, "initialized"], "yes"), r"layers\[0\].initialized must be true or false"),
    "previous-state flags": (_set(["layers", 1, "has_previous_state"], [True]), r"layers\[1\].has_previous_state"),
    "not a state": (lambda s: s.pop("tensors"), "A cache state is a dict"),
}


@pytest.fixture(scope="module")
def saved_state(model):
    cache, _, _ = _prompted(model, static=False)
    return cache.state_dict()


def test_the_unchanged_state_loads(model, saved_state):
    """The control for the refusals below: each of them changes one field of this state."""
    assert InfiniteVLCache.from_state_dict(model.config, copy.deepcopy(saved_state)).seen_tokens == saved_state["seen_tokens"]


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_changed_state_is_refused_naming_the_field(model, saved_state, change):
    state = copy.deepcopy(saved_state)
    apply, match = CHANGES[change]
    apply(state)
    with pytest.raises(ValueError, match=match):
        InfiniteVLCache.from_state_dict(model.config, state)
    with pytest.raises(ValueError, match=match):
        InfiniteVLCache.check_state_dict(model.config, state)


def test_a_state_of_another_config_is_refused(saved_state):
    """Layer kinds are held against the config: a model whose layer 1 is attention refuses layer 1's record."""
    other = tiny_config(layer_types=["sliding_attention"] * 2 + ["linear_attention"] * 3)
    with pytest.raises(ValueError, match="Saved layer 1 is linear_attention, the model's is attention"):
        InfiniteVLCache.from_state_dict(other, copy.deepcopy(saved_state))
