"""Which path a `generate()` call decodes through: a plain function of the device, the flags and the model.

- "graph": each new token replays one captured CUDA graph (`decode_graphs.py`) of the fused decode step, or,
  for models that step cannot read (quantized or LoRA layers), of the module path itself (`step="modules"`).
- "static": the module path over a static cache (window rings); no per-step host work grows with the context.
- "dynamic": the module path over the growing window cache: the reference, and what CPUs run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GRAPH_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class DecodePlan:
    """How decode steps run, and (for anything but "graph") why not faster."""

    path: str  # "graph", "static" or "dynamic"
    reason: str | None = None
    # what a "graph" replays: "compiled", the fused decode step (the package's kernels; cuBLAS's products for
    # batches; the name is from when batches compiled it), or the "modules"
    step: str = "compiled"


def decode_plan(
    *,
    device_type: str,
    dtype: torch.dtype,
    training: bool = False,
    disable_compile: bool = False,
    output_attentions: bool = False,
    output_hidden_states: bool = False,
    triton_available: bool = True,
    model_problem: str | None = None,
    capture_problem: str | None = None,
    static_requested: bool = False,
    static_possible: bool = True,
) -> DecodePlan:
    """The decode path for one `generate()` call.

    model_problem: why the compiled step cannot read this model's weights (`DecodeStep.unsupported`), or None.
    capture_problem: why no decode graph can serve this model at all (`decode_step.decoder_problems`), or None.
    static_requested: `cache_implementation="static"`, which off CUDA still decodes over the rings.
    static_possible: False when some layer is full attention (its cache grows without bound: no static cache).
    """
    if not static_possible:
        return DecodePlan("dynamic", "full-attention layers keep every token, so the cache cannot be static")
    if device_type != "cuda":
        return DecodePlan("static" if static_requested else "dynamic",
                          f"the model runs on {device_type}: captured decode graphs need CUDA")
    if training:
        return DecodePlan("dynamic", "the model is in training mode")
    if output_attentions:
        return DecodePlan("dynamic", "output_attentions=True: attention weights come from the module path")
    if output_hidden_states:
        return DecodePlan("static", "output_hidden_states=True: hidden states come from the module path")
    if disable_compile:
        return DecodePlan("static", "disable_compile=True")
    if not triton_available:
        return DecodePlan("static", "Triton is not installed (the compiled decode step needs it)")
    if dtype not in GRAPH_DTYPES:
        return DecodePlan("static", f"the compiled decode step does not cover {dtype}")
    if capture_problem is not None:
        return DecodePlan("static", capture_problem)
    if model_problem is not None:
        return DecodePlan("graph", model_problem, step="modules")
    return DecodePlan("graph")
