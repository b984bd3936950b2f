"""Where the speed-ups keep weights, settled before anything records an address.

Two speed-ups re-lay parameters as views into buffers of their own: the decode step joins each layer's input
projections (`DecodeStep.join_weights`), and the vision MLP pads its weights (`vision.mlp`). A captured graph
reads the weights at fixed addresses, and the graphs kept on the model check those addresses before each reuse,
so every re-layout must happen before the first capture or record: one that happened later (the vision MLP's,
on its first CUDA call inside the first captured prompt) made the second `generate()` of a process drop its
graphs and capture them all again.
"""

from __future__ import annotations

from .decode_step import DecodeStep
from .model_walk import weight_addresses
from .vision.mlp import InfiniteVLVisionMLP


_LAID_OUT_FOR = "_infinitevl_laid_out_for"  # the weight record (`weight_addresses`) the last layout left


def lay_out_weights(model) -> None:
    """Put every weight the speed-ups re-lay in its final place now; later calls find them there and copy nothing.
    A call that finds the weights as the last layout left them returns at once (the module path's `generate()`
    asks on every call; the checks behind a layout walk every layer)."""
    if model.__dict__.get(_LAID_OUT_FOR) == weight_addresses(model):
        return
    DecodeStep.join_weights(model)
    visual = getattr(model.model, "visual", None)
    for module in visual.modules() if visual is not None else ():
        if isinstance(module, InfiniteVLVisionMLP):
            module.lay_out()
    model.__dict__[_LAID_OUT_FOR] = weight_addresses(model)
