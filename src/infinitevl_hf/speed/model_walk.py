"""What every `generate()` call checks about the model's modules and weights, walked once per module tree.

A captured graph replays fixed kernels on fixed weight addresses, so each call checks the model again: which
modules and weights it has (`decode_step.decoder_problems`) and where the weights live (the record the graphs
compare, `decode_graphs._weight_addresses`). Walking a 4B model's thousand modules for this took 8-9 ms of every
call on an H200's host, all of it before the prompt's graph could start.

`model_walk(model)` keeps the walk on the model and re-walks only when the tree changed: a module or parameter
added, removed or replaced anywhere in it (checked per call by identity, about a tenth of the walk). What can change
without changing the tree is read again on every call: the weights' addresses and dtypes (`model.to()`, `param.data
= ...`) and accelerate's hooks; the decoder's problems are kept for the (addresses, hooks) they were found with.
"""

from __future__ import annotations

from torch import nn

from .decode_graphs import _addresses
from .decode_step import decoder_problems, preorder_modules

_KEY = "_infinitevl_model_walk"


def _tree(modules: list[nn.Module]) -> tuple[list[int], list[int]]:
    """Identities of every child slot and every parameter slot of `modules` (None included): equal lists mean the
    same modules holding the same parameter objects."""
    children = [id(child) for module in modules for child in module._modules.values()]
    params = [id(p) for module in modules for p in module._parameters.values()]
    return children, params


class ModelWalk:
    """The model's modules in `named_modules()` order (the decoder's walk spliced in), its parameters (each once,
    in that order), and the decoder's problems for the weights and hooks they were found with."""

    def __init__(self, model):
        decoder = model.model.language_model
        self.decoder_modules = preorder_modules(decoder)
        self.modules = preorder_modules(model, {id(decoder): self.decoder_modules})
        self.checked = [*self.decoder_modules, model.lm_head]  # what `decoder_problems` reads
        self.tree = _tree(self.modules)
        params = {id(p): p for module in self.modules for p in module._parameters.values() if p is not None}
        self.parameters = list(params.values())
        self._problems: tuple[tuple, tuple] | None = None

    def current(self) -> bool:
        """Whether the model's tree is still the one walked (same modules, same parameter objects)."""
        return _tree(self.modules) == self.tree

    def weights(self) -> tuple:
        """Where every parameter's data lives, and its dtype: `decode_graphs._weight_addresses(model)`, read now."""
        return tuple((p.data_ptr() or _addresses(p), p.dtype) for p in self.parameters)  # as `_addresses`, fewer calls

    def problems(self, model, weights: tuple) -> tuple[str | None, str | None]:
        """`decoder_problems(model)`, found again only when the weights or accelerate's hooks changed."""
        key = (weights, tuple(i for i, module in enumerate(self.checked) if "_hf_hook" in module.__dict__))
        if self._problems is None or self._problems[0] != key:
            self._problems = (key, decoder_problems(model, self.decoder_modules))
        return self._problems[1]


def model_walk(model) -> ModelWalk:
    """The model's walk, kept on it (outside its modules and state dict) and walked again when its tree changed."""
    walk = model.__dict__.get(_KEY)
    if walk is None or not walk.current():
        walk = model.__dict__[_KEY] = ModelWalk(model)
    return walk


def forget_walk(model) -> None:
    """Drop the kept walk (the next call walks again)."""
    model.__dict__.pop(_KEY, None)


__all__ = ["ModelWalk", "forget_walk", "model_walk"]
