"""Projections of one input run as one product, where their weights were laid out side by side.

Before its first CUDA graph the speed path lays each layer's input projections out as row blocks of one buffer
(a Gated DeltaNet's q/k/v/a/b/g, attention's q/k/v, the MLP's gate/up; `speed.weight_layout`). For one token
per row, outside autograd, the module path then runs each group as one product over the joined rows and splits
the result: one launch and one round of host work where there were up to six, which is what one decode token of
the module path costs. A single row (batch 1) takes the product as one matrix-vector kernel (`ops.matvec`), the
MLP's SiLU gate fused in (`project_glu`), and so do the output projections (`apply_linear`). Everything else
(prompts, gradients, a module that is not a plain `nn.Linear` or that has hooks, weights not laid out together)
calls each projection as usual. The joined product sums the same terms; only the kernel's order of summation can
differ, as it can between any two GEMM shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .as_defined import global_hooks, runs_as_defined, runs_as_defined_here
from .ops.elementwise import silu_glu, silu_mul
from .ops.matvec import KERNEL_DTYPES, ConvUpdate, gated_rms_norm_matvec, matvec, rms_norm_matvec
from .ops.norms import rms_norm
from .rms_norm import InfiniteVLRMSNorm


def adjacent_rows(params: tuple[torch.Tensor, ...]) -> bool:
    """True when the tensors are contiguous row blocks of one storage, in order, with nothing between them."""
    first = params[0]
    if any(not p.is_contiguous() or p.dtype != first.dtype or p.shape[1:] != first.shape[1:] for p in params):
        return False
    storage = first.untyped_storage().data_ptr()
    if any(p.untyped_storage().data_ptr() != storage for p in params):
        return False
    offsets = [p.storage_offset() for p in params]
    return all(b == a + p.numel() for a, b, p in zip(offsets, offsets[1:], params))


def rows_view(params: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """One view over adjacent row blocks (`adjacent_rows`), detached: all of their rows, no copy."""
    return _rows(params[0], sum(p.shape[0] for p in params))


def _adjacent_layout(weights: tuple[torch.Tensor, ...], biases: tuple) -> bool:
    if not adjacent_rows(weights):
        return False
    return all(b is None for b in biases) or (all(b is not None for b in biases) and adjacent_rows(biases))


_LAYOUT_KEY = "_infinitevl_joined_layout"


def joined_weight(linears: tuple[nn.Module, ...], cls: type = nn.Linear
                  ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) over all of `linears`' output rows, when one product may stand in for their calls (each
    exactly a `cls` that runs as defined: `nn.Linear`, or the Gated DeltaNet's convolutions); else None.

    Whether the parameters are laid out side by side is kept on the first module for the parameters (identity,
    address and rows) it was found for: moving or replacing any of them is seen on the next call. Only the answer (and the
    joined rows' count) is kept, not a view: a kept view would hold the joined buffer alive after the weights
    moved (`model.cpu()`). A single linear is its own weight and bias."""
    if global_hooks():
        return None
    for module in linears:  # (a loop, not all(...): this runs about 170 times a decode step)
        if not runs_as_defined_here(module, cls):
            return None
    if len(linears) == 1:
        params = linears[0]._parameters
        return params["weight"], params.get("bias")
    weights = [m._parameters["weight"] for m in linears]
    biases = [m._parameters.get("bias") for m in linears]
    key = [*map(id, weights), *map(torch.Tensor.data_ptr, weights), *[w.shape[0] for w in weights]]
    if any(b is not None for b in biases):
        key += [(id(b), b.data_ptr()) if b is not None else None for b in biases]
    kept = linears[0].__dict__.get(_LAYOUT_KEY)
    if kept is None or kept[0] != key:
        joined = _adjacent_layout(tuple(weights), tuple(biases))
        rows = sum(w.shape[0] for w in weights)
        kept = linears[0].__dict__[_LAYOUT_KEY] = (key, joined, rows)
    if not kept[1]:
        return None
    rows = kept[2]
    return _rows(weights[0], rows), (_rows(biases[0], rows) if biases[0] is not None else None)


def _rows(first: torch.Tensor, rows: int) -> torch.Tensor:
    """A detached view of `rows` rows from `first` on (row blocks laid out side by side, starting with it)."""
    return first.detach().as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def norm_parameters(norm: nn.Module) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of an `InfiniteVLRMSNorm` whose call its math may stand in for (`runs_as_defined`: no hooks,
    a plain weight), so that it can run inside the product after it; else None (the norm is called)."""
    if not runs_as_defined(norm, InfiniteVLRMSNorm):
        return None
    return norm._parameters["weight"], norm.variance_epsilon


def _one_token_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, glu: bool = False,
                       residual: torch.Tensor | None = None, in_place: bool = False,
                       norm: tuple[torch.Tensor, float] | None = None):
    """F.linear(x, weight, bias) (+ residual) for x [..., 1, in]: a single row as one matrix-vector product
    (`ops.matvec`: a Triton kernel on CUDA, streaming the weight once, where cuBLAS takes one or two launches of
    GEMM tiles), the residual added in its epilogue and, in_place, written over it. The kernel rounds the product
    before the add, as the two eager ops do; where it cannot take the call (a non-contiguous weight, say) and the
    rows path can, cuBLAS adds the residual in its epilogue and rounds once. Several rows: F.linear, then an eager
    add. Under autocast, F.linear (the kernel would compute in the weights' dtype). norm: (weight, eps) of an
    RMSNorm to apply to x first (`norm_parameters`; not with a residual), for a single row inside the product
    (`ops.matvec.rms_norm_matvec`: the kernel's prologue)."""
    if norm is not None and residual is not None:
        raise ValueError("a product with a norm before it takes no residual (the kernel's prologue has no room for it)")
    if x.numel() == x.shape[-1] and not torch.is_autocast_enabled(x.device.type):
        rest = x.shape[:-1]
        if norm is not None:
            return rms_norm_matvec(x.reshape(1, -1), *norm, weight, bias, glu=glu).view(*rest, -1)
        if residual is not None:
            residual = residual.reshape(1, -1)
        return matvec(x.reshape(1, -1), weight, bias, residual, glu=glu, in_place=in_place).view(*rest, -1)
    if norm is not None:
        x = rms_norm(x, *norm)
    y = F.linear(x, weight, bias)
    y = silu_glu(y) if glu else y
    return y if residual is None else residual + y


def project(x: torch.Tensor, linears: tuple[nn.Module, ...], norm: nn.Module | None = None) -> tuple[torch.Tensor, ...]:
    """Each of `linears` applied to x [..., T, in]: for one token per row (T == 1) outside autograd, one product
    when their weights are laid out side by side (`joined_weight`), split into views; else one call each.
    norm: a module to apply to x first (a layer's pre-norm): inside that one product where it is an RMSNorm that
    runs as defined (`norm_parameters`), else called."""
    if x.shape[-2] == 1 and not torch.is_grad_enabled():
        joined = joined_weight(linears)
        if joined is not None:
            x, parameters = _norm_or_parameters(x, norm)
            return _one_token_product(x, *joined, norm=parameters).split([m.out_features for m in linears], dim=-1)
    if norm is not None:
        x = norm(x)
    return tuple(m(x) for m in linears)


def _norm_or_parameters(x: torch.Tensor, norm: nn.Module | None) -> tuple[torch.Tensor, tuple | None]:
    """(x, the norm's parameters) where the norm can run inside the product; (norm(x), None) where it is called;
    (x, None) without a norm."""
    if norm is None:
        return x, None
    parameters = norm_parameters(norm)
    return (x, parameters) if parameters is not None else (norm(x), None)


def apply_linear(x: torch.Tensor, linear: nn.Module, residual: torch.Tensor | None = None,
                 in_place: bool = False) -> torch.Tensor:
    """`linear(x)`, plus `residual` when given; for one token per row outside autograd, where the module runs as
    defined, its product taken directly (one decode row: one matrix-vector product, the residual added in it and,
    in_place, written over it), as `project` does for a group."""
    if x.shape[-2] == 1 and not torch.is_grad_enabled():
        joined = joined_weight((linear,))
        if joined is not None:
            return _one_token_product(x, *joined, residual=residual, in_place=in_place)
    y = linear(x)
    return y if residual is None else residual + y


def apply_gated_norm_linear(x: torch.Tensor, gate: torch.Tensor, norm: nn.Module, norm_cls: type,
                            linear: nn.Module) -> torch.Tensor | None:
    """`linear(norm(x, gate))` for x and gate [B, 1, H, D] (a Gated DeltaNet's output norm per head, then its
    output projection) as one op (`ops.matvec.gated_rms_norm_matvec`: for one CUDA row one kernel, the norm in
    the product's prologue), outside autograd and autocast, where the norm is exactly a `norm_cls` and the linear an
    `nn.Linear` without bias, both running as defined. None otherwise, before anything ran: the caller calls them."""
    if (x.shape[-3] != 1 or torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type)
            or not runs_as_defined(norm, norm_cls)):
        return None
    joined = joined_weight((linear,))
    if joined is None or joined[1] is not None:
        return None
    batch = x.shape[0]
    y = gated_rms_norm_matvec(x.reshape(batch, -1), gate.reshape(batch, -1), norm._parameters["weight"], norm.eps,
                              joined[0])
    return y.view(batch, 1, -1)


def project_convolved(x: torch.Tensor, linears: tuple[nn.Module, ...], convs: tuple[nn.Module, ...], conv_cls: type,
                      states: tuple[torch.Tensor, ...], norm: nn.Module | None = None) -> tuple[torch.Tensor, ...] | None:
    """`project(x, linears, norm)` with the first len(convs) outputs through their depthwise causal convolutions
    (+ SiLU) over `states` [B, D, W-1], which are shifted in place: for one token per row outside autograd, one
    product with the convolutions in it (`ops.matvec`'s `conv`: on CUDA one launch for one row, cuBLAS's product
    and one convolution kernel for several), and the norm in front of it where it runs as defined (else called
    first), where the projections and the convolutions (each exactly a `conv_cls`, running as defined) are each
    laid out side by side. None
    otherwise, before anything ran: the caller runs them apart. The convolutions compute in float32 either
    way (float64 inputs are left to the separate ops, which compute in float64)."""
    if (x.shape[-2] != 1 or x.dtype not in KERNEL_DTYPES or torch.is_grad_enabled()
            or torch.is_autocast_enabled(x.device.type)):
        return None
    joined = joined_weight(linears)
    conv = joined_weight(convs, conv_cls) if joined is not None else None
    if conv is None or any(s is None for s in states):
        return None
    x, parameters = _norm_or_parameters(x, norm)
    rows = x.reshape(-1, x.shape[-1])
    update = ConvUpdate(conv[0].squeeze(1), conv[1], tuple(states))
    if parameters is not None:
        y = rms_norm_matvec(rows, *parameters, *joined, conv=update)
    else:
        y = matvec(rows, *joined, conv=update)
    return y.view(*x.shape[:-1], -1).split([m.out_features for m in linears], dim=-1)


def project_glu(x: torch.Tensor, gate_proj: nn.Module, up_proj: nn.Module) -> torch.Tensor:
    """`silu(gate_proj(x)) * up_proj(x)` (`ops.elementwise.silu_mul`): one product, the gate fused in, for one
    decode token where the two weights are laid out side by side without biases."""
    if x.shape[-2] == 1 and not torch.is_grad_enabled() and gate_proj.out_features == up_proj.out_features:
        joined = joined_weight((gate_proj, up_proj))
        if joined is not None and joined[1] is None:
            return _one_token_product(x, joined[0], None, glu=True)
    return silu_mul(*project(x, (gate_proj, up_proj)))
