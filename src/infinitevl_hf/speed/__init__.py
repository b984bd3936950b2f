"""The speed machinery, applied to the model from outside; `modeling/` stays the reference it is tested against.

The model reaches it through two calls: `speed.vision.speed_up_vision_tower` when it builds its vision tower,
and `generation.fast_forward` at the top of `forward` (inside `generate()` only; None means "run the modules").

- `model_walk`: the model's modules and weights as the per-call checks read them, walked once per module tree.
- `plan`: which decode path a `generate()` call takes (captured graph, or the module path over a static or
  dynamic cache), as a plain function of device, flags and model, with the reason for every fallback.
- `generation`: the per-call scope (`generate_call`), the plan for the call's cache, `fast_forward`, `warmup`.
- `decode_graphs` / `prompt_graphs`: graphs kept on the model (one static cache per batch size, dtype and
  device), reused by every later call; prompts are captured in bucketed lengths.
- `graph_capture`: capture over a cache (`capture_over_cache`), the captured decode step and captured prefill.
- `compile_ahead`: a capture's first warm-up, with Triton's first launches compiled side by side on threads.
- `frame_graphs`: a whole streamed call (vision tower included) captured as one graph (`StreamingSession`).
- `decode_step`: the decoder's one-token step as plain tensor functions over the package's kernels (captured as
  they are; `compile=True` compiles them), the one second formulation of the layer math (its docstring says why;
  tests pin it to the modules).
- `weight_layout`: the weights the speed-ups re-lay (joined projections, padded vision MLPs), settled before any
  graph records where they are.
- `vision`: faster equivalents of the vision tower's modules.
"""

from .decode_graphs import DecodeGraphs, GraphSlot, decode_graphs_of
from .generation import fast_forward, generate_call, plan_for_model, plan_generation, warmup
from .plan import DecodePlan, decode_plan

__all__ = [
    "DecodeGraphs",
    "DecodePlan",
    "GraphSlot",
    "decode_graphs_of",
    "decode_plan",
    "fast_forward",
    "generate_call",
    "plan_for_model",
    "plan_generation",
    "warmup",
]
