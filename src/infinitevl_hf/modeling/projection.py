"""`linear(x)` for the decoder's projections, with one row of CUDA inference (a decode token at batch 1) through
the package's matrix-vector kernel (`ops.matvec`).

At one row, `F.linear`'s way into cuBLAS (transpose, matmul, reshape, the library's own setup) costs several
times the host time of the launch, and a module-path decode step makes about 330 of these products. Only a
plain `nn.Linear` is taken this way: one with hooks, a replaced `forward` (accelerate), a subclass (LoRA,
bitsandbytes) or weights that are not plain tensors (torchao) is called as a module, as is every other input.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module

from .ops.matvec import matvec


def _plain(linear: nn.Linear, x: torch.Tensor) -> bool:
    weight = linear.weight
    return (type(linear) is nn.Linear and not linear._forward_hooks and not linear._forward_pre_hooks
            and "forward" not in vars(linear) and not _module._global_forward_hooks
            and not _module._global_forward_pre_hooks and weight.dtype == x.dtype and type(weight.data) is torch.Tensor)


def project(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`linear(x)`; for one CUDA row without autograd, the product through `ops.matvec` (which keeps `F.linear`
    where its kernel does not fit)."""
    if (x.is_cuda and x.numel() == x.shape[-1] and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and _plain(linear, x)):
        return matvec(x.reshape(1, -1), linear.weight, linear.bias).view(*x.shape[:-1], -1)
    return linear(x)
