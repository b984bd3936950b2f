"""`speed.model_walk`: the per-call checks of the model's modules and weights, walked once per module tree.

The kept walk must give what a fresh walk gives (the graphs' weight record, the decoder's problems), be walked again
whenever a module or parameter of the tree is added, removed or replaced or a module's class swapped, and keep
nothing of the model alive."""

import gc
import weakref

import pytest
import torch
from torch import nn

from helpers import tiny_model
from infinitevl_hf.speed.decode_step import decoder_problems
from infinitevl_hf.speed.model_walk import model_walk


def _weight_addresses(model):
    """A fresh record of the weights: every parameter once, in `named_modules()` order, where it lives, its dtype."""
    return tuple((p.data_ptr(), p.dtype) for p in model.parameters())


@pytest.fixture
def model():
    return tiny_model(seed=4)


def test_the_kept_walk_gives_a_fresh_walks_record_and_problems(model):
    walk = model_walk(model)
    assert walk.weights() == _weight_addresses(model)
    assert walk.problems(model, walk.weights()) == decoder_problems(model) == (None, None)
    assert model_walk(model) is walk  # kept: the next call does not walk again
    assert "_infinitevl_model_walk" not in model.state_dict()


def _replace_a_projection(model):
    mlp = model.model.language_model.layers[0].mlp
    mlp.up_proj = nn.Linear(mlp.up_proj.in_features, mlp.up_proj.out_features, bias=False)


def _delete_a_norm(model):
    del model.model.language_model.layers[1].post_attention_layernorm


def _write_the_children_dict(model):
    layers = model.model.language_model.layers
    layers._modules["0"] = layers[1]


def _replace_a_parameter(model):
    head = model.lm_head
    head.weight = nn.Parameter(head.weight.detach().clone())


def _add_a_module(model):
    model.model.language_model.layers[0].mlp.extra = nn.Linear(2, 2)


class _NotPlainLinear(nn.Linear):
    pass


def _swap_a_class(model):
    model.model.language_model.layers[0].mlp.up_proj.__class__ = _NotPlainLinear


def _replace_with_a_subclass(model):
    mlp = model.model.language_model.layers[0].mlp
    mlp.up_proj = _NotPlainLinear(mlp.up_proj.in_features, mlp.up_proj.out_features, bias=False)


@pytest.mark.parametrize("change", [_replace_a_projection, _delete_a_norm, _write_the_children_dict,
                                    _replace_a_parameter, _add_a_module, _swap_a_class, _replace_with_a_subclass])
def test_any_change_of_the_tree_walks_again(model, change):
    walk = model_walk(model)
    walk.problems(model, walk.weights())
    change(model)
    again = model_walk(model)
    assert again is not walk
    assert again.weights() == _weight_addresses(model)
    assert again.problems(model, again.weights()) == decoder_problems(model)
    assert model_walk(model) is again
    if change in (_swap_a_class, _replace_with_a_subclass):
        assert "not a plain nn.Linear" in again.problems(model, again.weights())[0]


def test_the_walk_keeps_nothing_alive(model):
    walk = model_walk(model)
    mlp = model.model.language_model.layers[0].mlp
    old = weakref.ref(mlp.up_proj)
    _replace_a_projection(model)
    assert old() is None  # the replaced layer is freed at once, not at the next call
    assert not walk.current(model)

    other = tiny_model(seed=5)
    model_walk(other)
    gone = weakref.ref(other)
    gc.disable()  # freed by reference counting alone: no cycle through the walk in the model's __dict__
    try:
        del other
        assert gone() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("how", ["deepcopy", "copy", "pickle"])
def test_a_copied_model_walks_its_own_modules(model, how):
    """A copy must not take the original's walk: LoRA added to a deep copy, say, would otherwise go unseen (the
    walk's weak references still point at the original's modules, whose tree did not change)."""
    import copy
    import io

    walk = model_walk(model)
    if how == "pickle":
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        other = torch.load(buffer, weights_only=False)
    else:
        other = getattr(copy, how)(model)
    if how != "copy":
        assert other.__dict__.get("_infinitevl_model_walk") is None  # not carried over
    if how != "copy":  # a shallow copy shares the modules themselves; a deep one gets modules of its own
        other.model.language_model.layers[0].mlp.up_proj.__class__ = type("Adapted", (nn.Linear,), {})
        assert "not a plain nn.Linear" in model_walk(other).problems(other, model_walk(other).weights())[0]
    assert model_walk(other) is not walk and model_walk(model) is walk
