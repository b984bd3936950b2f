"""One rank of the tensor-parallel test: load the checkpoint in DIR with `tp_plan="auto"`, run the inputs saved in
DIR/inputs.pt, and (rank 0) write the logits and greedy tokens to DIR/tensor_parallel.pt. Run with torchrun."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from infinitevl_hf import InfiniteVLForConditionalGeneration


def main(folder: str) -> None:
    model = InfiniteVLForConditionalGeneration.from_pretrained(folder, tp_plan="auto", dtype=torch.float32).eval()
    world = dist.get_world_size()
    text = model.model.language_model
    gdn = next(layer.self_attn for layer in text.layers if layer.layer_type == "linear_attention")
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    shards = {
        # each rank holds its share of the Gated DeltaNet heads, their conv channels and decay parameters
        "A_log": local(gdn.A_log).shape[0] * world == gdn.num_heads,
        "q_conv1d": local(gdn.q_conv1d.weight).shape[0] * world == gdn.key_dim,
        "g_proj": local(gdn.g_proj.weight).shape[0] * world == gdn.value_dim,
        "tied": model.lm_head.weight is text.embed_tokens.weight,
    }
    inputs = torch.load(os.path.join(folder, "inputs.pt"))
    results = {"shards": shards}
    with torch.no_grad():
        for name, kwargs in inputs.items():
            results[f"{name}_logits"] = model(**kwargs).logits
            results[f"{name}_tokens"] = model.generate(**kwargs, max_new_tokens=6, do_sample=False)
    if dist.get_rank() == 0:
        torch.save(results, os.path.join(folder, "tensor_parallel.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
