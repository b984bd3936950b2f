"""Swap a transformers module for this package's subclass of it in place: only `__class__` changes, so the
parameters, their names and loading/saving stay as they are."""

from __future__ import annotations

from torch import nn


def retype(module: nn.Module, parent: type, replacement: type, where: str) -> None:
    """Make `module`, a `parent` (or already a `replacement`), a `replacement`; refuse any other module."""
    if type(module) not in (parent, replacement):
        raise TypeError(f"expected {parent.__name__} {where}, got {type(module).__name__}")
    module.__class__ = replacement
