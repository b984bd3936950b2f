"""`speed.model_walk`: the per-call checks of the model's modules and weights, walked once per module tree.

The kept walk must give what a fresh walk gives (the graphs' weight record, the decoder's problems), and be walked
again whenever the tree changes, however it changes."""

import pytest
import torch
from torch import nn

from helpers import tiny_model
from infinitevl_hf.speed.decode_graphs import _weight_addresses
from infinitevl_hf.speed.decode_step import decoder_problems
from infinitevl_hf.speed.model_walk import model_walk


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


@pytest.mark.parametrize("change", [_replace_a_projection, _delete_a_norm, _write_the_children_dict,
                                    _replace_a_parameter, _add_a_module])
def test_any_change_of_the_tree_walks_again(model, change):
    walk = model_walk(model)
    change(model)
    again = model_walk(model)
    assert again is not walk
    assert again.weights() == _weight_addresses(model)
    assert model_walk(model) is again


def test_moved_weights_and_hooks_are_read_on_every_call(model):
    walk = model_walk(model)
    before = walk.weights()
    layer = model.model.language_model.layers[0].mlp.down_proj
    with torch.no_grad():
        layer.weight.data = layer.weight.data.clone()  # same parameter object, new storage: the tree is unchanged
    assert model_walk(model) is walk
    assert walk.weights() != before and walk.weights() == _weight_addresses(model)

    layer.weight.requires_grad_(False)
    layer.weight.data = layer.weight.data.to(torch.int8)  # the decoder's problems follow the weights
    capture, compiled = walk.problems(model, walk.weights())
    assert capture is None and "not floating point" in compiled

    layer.weight.data = layer.weight.data.float()
    assert walk.problems(model, walk.weights()) == (None, None)
    model.model.language_model.layers[2].__dict__["_hf_hook"] = object()  # accelerate's hook: an attribute
    capture, _ = walk.problems(model, walk.weights())
    assert "accelerate" in capture
