"""Whether a module's call may be stood in for by its math (a fused op taking the place of several calls).

The module path fuses neighbouring modules' work at decode (a norm into the product after it, a residual into the
MLP's down product, projections into one product). It may do so only where each module's call would run its
class's forward and nothing else: no hooks, no instance-level forward, not compiled, not a subclass, and (for
`runs_as_defined`) weights that are plain tensors. Everything else is called as usual.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as torch_module


_PLAIN_TENSORS = (nn.Parameter, torch.Tensor)


def runs_as_defined(module: nn.Module, cls: type) -> bool:
    """Whether `module`'s call may be stood in for by its math: exactly a `cls`, without hooks (its own or global)
    or an instance-level forward, with plain-tensor weight and bias. A subclass (LoRA, quantized layers), an
    instance forward (accelerate), a hook, or a weight of a tensor subclass (torchao's quantized weights, DTensor
    shards) must run as called."""
    return not global_hooks() and runs_as_defined_here(module, cls)


def global_hooks() -> bool:
    """Whether global forward hooks are registered (`nn.modules.module.register_module_forward_hook`): every
    module's call then runs them."""
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


def calls_as_defined(module: nn.Module, cls: type) -> bool:
    """Whether `module`'s call runs `cls.forward` and nothing else: exactly a `cls`, without forward hooks (its own
    or global), an instance-level forward or a compiled call (`module.compile()`). Backward hooks are not asked
    about: the callers stand in for a call only outside autograd. (`runs_as_defined` also asks this of the
    weights.)"""
    return not global_hooks() and calls_as_defined_here(module, cls)


def calls_as_defined_here(module: nn.Module, cls: type) -> bool:
    """`calls_as_defined` without asking about global hooks (a caller checking a group asks that once)."""
    return not (type(module) is not cls or module._forward_hooks or module._forward_pre_hooks
                or "forward" in module.__dict__ or module.__dict__.get("_compiled_call_impl") is not None)


def runs_as_defined_here(module: nn.Module, cls: type) -> bool:
    """`runs_as_defined` without asking about global hooks."""
    # (the parameters read from `_parameters`: `module.weight` goes through nn.Module.__getattr__, several times
    # slower, and a decode step of the module path asks this about 250 times)
    if not calls_as_defined_here(module, cls):
        return False
    params = module._parameters
    bias = params.get("bias")
    return type(params.get("weight")) in _PLAIN_TENSORS and (bias is None or type(bias) in _PLAIN_TENSORS)
