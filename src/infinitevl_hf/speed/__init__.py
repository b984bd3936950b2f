"""Speed machinery applied to the model from outside: the decode path of `generate()` and its captured graphs.

The model calls in through `generation.fast_decode` only; the modules in `modeling/` stay the reference.
"""

from .decode_graphs import DecodeGraphs, GraphSlot, decode_graphs_of
from .generation import fast_decode, fast_prompt, generate_call, plan_for_model, plan_generation, warmup
from .plan import DecodePlan, decode_plan

__all__ = [
    "DecodeGraphs",
    "DecodePlan",
    "GraphSlot",
    "decode_graphs_of",
    "decode_plan",
    "fast_decode",
    "fast_prompt",
    "generate_call",
    "plan_for_model",
    "plan_generation",
    "warmup",
]
