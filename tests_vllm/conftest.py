"""vLLM tests: run in their own environment (`.ci/run` builds it), on CPU, with one in-process engine."""

from __future__ import annotations

import os

# vLLM reads these when it is imported: CPU platform, the engine in this process (~2 s to start instead of ~15 s),
# a small KV cache, no usage reports. One thread: the measured tolerances hold for it, and the machine is shared.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

# vllm-cpu 0.32's AVX512-BF16 build (chosen on CPUs with AVX512-BF16, at vLLM's import) returns NaN from its
# attention for this suite's 32-wide heads past about 200 prompt tokens, in the rows of the last partial 64-token
# block; its AVX512 build, which the suite ran on before, does not. The suite checks the plugin, so it runs that
# build everywhere (README, "vLLM", says what this means for users on such CPUs). That build has no AMX kernels:
# on CPUs with AMX, vLLM would still route small bf16 products to its AMX GEMM (`check_cpu_sgl_kernel`), whose
# weight-packing op only the AVX512-BF16 build registers, so AMX is hidden too.
torch.cpu._is_avx512_bf16_supported = lambda: False
torch.cpu._is_amx_tile_supported = lambda: False

from vllm_helpers import ENGINE_ARGS, write_checkpoint



@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("vllm") / "tiny-infinitevl")


@pytest.fixture(scope="session")
def reference(checkpoint):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(checkpoint)


@pytest.fixture(scope="session")
def llm(checkpoint):
    from vllm import LLM

    return LLM(model=str(checkpoint), **ENGINE_ARGS)
