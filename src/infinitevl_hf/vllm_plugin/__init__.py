"""Serve InfiniteVL with vLLM: an out-of-tree model plugin (`pip install "infinitevl-hf[vllm]"`).

vLLM finds the plugin through the `vllm.general_plugins` entry point and calls `register()`, which registers
`InfiniteVLForConditionalGeneration` (and the official release's class name) with vLLM's `ModelRegistry`.
The model is built from vLLM's own layers and kernels: Qwen2.5-VL's vision tower and multimodal processing,
its paged attention with a per-layer sliding window, its Gated DeltaNet layer and state cache.

```
vllm serve path/to/InfiniteVL-4B --dtype bfloat16
```
"""

from __future__ import annotations

ARCHITECTURES = ("InfiniteVLForConditionalGeneration", "InfiniteVLQwen2_5_VLForConditionalGeneration")
VLLM_HINT = 'pip install "infinitevl-hf[vllm]"'


def require_vllm():
    """Import vLLM, or raise an ImportError that says how to install it."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(f"Serving InfiniteVL with vLLM needs vLLM, which is not installed: {VLLM_HINT}.") from error
    return vllm


def register() -> None:
    """The `vllm.general_plugins` entry point: register the InfiniteVL architectures with vLLM (idempotent)."""
    require_vllm()
    import infinitevl_hf  # noqa: F401  registers the configs and processor with transformers' Auto classes
    from vllm import ModelRegistry

    for name in ARCHITECTURES:
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, "infinitevl_hf.vllm_plugin.model:InfiniteVLForConditionalGeneration")


__all__ = ["ARCHITECTURES", "register", "require_vllm"]
