"""What every `generate()` call checks about the model's modules and weights, walked once per module tree.

A captured graph replays fixed kernels on fixed weight addresses, so each call checks the model again: which
modules and weights it has (`decode_step.decoder_problems`) and where the weights live (the record the graphs
compare, `weight_addresses`). Walking a 4B model's thousand modules for this took 8-9 ms of every
call on an H200's host, all of it before the prompt's graph could start.

`model_walk(model)` keeps the walk on the model and re-walks only when the tree changed: a module or parameter
added, removed or replaced anywhere in it, or a module's class swapped (checked per call by identity, for about a
third of the four walks' time). What can change without changing the tree is read again on every call: the
weights' addresses and dtypes (`model.to()`, `param.data = ...`) and accelerate's hooks; the decoder's problems are
kept for the (addresses, hooks) they were found with. Child names and the Gated DeltaNet layers' flags, which the
problems also read, are taken as fixed once a module is built.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .decode_step import decoder_problems, preorder_modules

_KEY = "_infinitevl_model_walk"


def _addresses(tensor: torch.Tensor):
    """Where a tensor's data lives; for a tensor subclass (torchao's quantized weights, whose own data_ptr() is 0),
    where its inner tensors live."""
    address = tensor.data_ptr()
    if address or not is_traceable_wrapper_subclass(tensor):
        return address
    names, _ = tensor.__tensor_flatten__()
    return tuple(_addresses(getattr(tensor, name)) for name in names)


def _tree(modules: list[nn.Module]) -> tuple[list[int], list[int], list[int]]:
    """Identities of every child slot and every parameter slot of `modules` (None included), and of each module's
    class: equal lists mean the same modules, of the same classes, holding the same parameter objects."""
    children = [id(child) for module in modules for child in module._modules.values()]
    params = [id(p) for module in modules for p in module._parameters.values()]
    return children, params, [id(type(module)) for module in modules]


class ModelWalk:
    """The model's modules in `named_modules()` order (the decoder's walk spliced in), its parameters (each once,
    in that order), and the decoder's problems for the weights and hooks they were found with. Held by weak
    references: the walk keeps no module or weight alive (nor the model, which holds the walk)."""

    def __init__(self, model):
        decoder = model.model.language_model
        decoder_modules = preorder_modules(decoder)
        modules = preorder_modules(model, {id(decoder): decoder_modules})
        params = {id(p): p for module in modules for p in module._parameters.values() if p is not None}
        self._model = weakref.ref(model)
        self._modules = [weakref.ref(module) for module in modules]
        self._decoder = [weakref.ref(module) for module in decoder_modules]
        self._checked = [*self._decoder, weakref.ref(model.lm_head)]  # what `decoder_problems` reads
        self._parameters = [weakref.ref(p) for p in params.values()]
        self._parameter_ids = list(params)
        self.tree = _tree(modules)
        self._problems: tuple[tuple, tuple] | None = None

    def __reduce__(self):
        # A copied or unpickled model walks its own modules: a deep copy of this walk would still point at the
        # original's (weak references are copied as they are), and weak references do not pickle.
        return _no_walk, ()

    def current(self, model) -> bool:
        """Whether this is `model`'s walk and its tree is still the one walked (same modules and classes, same
        parameter objects)."""
        if self._model() is not model:  # kept on a copy of the model (`copy.copy` shares the original's dict values)
            return False
        modules = [ref() for ref in self._modules]
        if None in modules:  # one is gone (its id may now be another module's)
            return False
        if [id(ref()) for ref in self._parameters] != self._parameter_ids:  # the same for weights (id(None) differs)
            return False
        return _tree(modules) == self.tree

    def weights(self) -> tuple:
        """Where every parameter's data lives, and its dtype, read now (`weight_addresses`)."""
        return tuple((p.data_ptr() or _addresses(p), p.dtype) for p in [ref() for ref in self._parameters])

    def problems(self, model, weights: tuple) -> tuple[str | None, str | None]:
        """`decoder_problems(model)`, found again only when the weights or accelerate's hooks changed. (Names of
        child modules and the Gated DeltaNet layers' flags, which it reads too, are taken as fixed.)"""
        key = (weights, tuple(i for i, ref in enumerate(self._checked) if "_hf_hook" in ref().__dict__))
        if self._problems is None or self._problems[0] != key:
            self._problems = (key, decoder_problems(model, [ref() for ref in self._decoder]))
        return self._problems[1]


def _no_walk() -> None:
    return None


def model_walk(model) -> ModelWalk:
    """The model's walk, kept on it (outside its modules and state dict) and walked again when its tree changed."""
    walk = model.__dict__.get(_KEY)
    if walk is None or not walk.current(model):
        walk = model.__dict__[_KEY] = ModelWalk(model)
    return walk


def weight_addresses(model) -> tuple:
    """Where every parameter of the model lives (each once, in `named_modules()` order), and its dtype: what the
    captured graphs depend on."""
    return model_walk(model).weights()


__all__ = ["ModelWalk", "model_walk", "weight_addresses"]
