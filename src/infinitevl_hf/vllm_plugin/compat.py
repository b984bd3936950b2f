"""Import vLLM's Qwen2.5-VL model code where torchvision is missing (vLLM's CPU wheels come without a working one).

vLLM's `qwen2_vl.py` imports `smart_resize` from transformers' torchvision-backed Qwen2-VL image processor
module, which cannot be imported without torchvision. The PIL twin of that module defines the same
`smart_resize`, so, only when the torchvision module fails to import, it is made to stand in for it.
"""

from __future__ import annotations

import importlib
import sys

TORCHVISION_MODULE = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
PIL_MODULE = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"


def use_pil_qwen2_vl_image_processing() -> None:
    """Make `TORCHVISION_MODULE` importable: itself when torchvision works, else its PIL twin."""
    if TORCHVISION_MODULE in sys.modules:
        return
    try:
        importlib.import_module(TORCHVISION_MODULE)
    except ImportError:
        sys.modules.pop(TORCHVISION_MODULE, None)
        sys.modules[TORCHVISION_MODULE] = importlib.import_module(PIL_MODULE)
