"""Tiny configs and inputs shared by the tests (fp32, CPU, seconds)."""

from __future__ import annotations

import torch

from infinitevl_hf import InfiniteVLConfig, InfiniteVLForConditionalGeneration

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 90, 91, 92, 93


def tiny_config(**text_overrides) -> InfiniteVLConfig:
    """Every layer kind present: SWA at 0 and 4, GDN elsewhere; window 8 so short inputs span several windows."""
    text = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_linear_heads=2,
        num_linear_key_value_heads=2,
        linear_head_dim=8,
        expand_v=2,
        sliding_window=8,
        rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
        max_position_embeddings=4096,
        prefill_chunk_tokens=None,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    text.update(text_overrides)
    vision = dict(
        depth=2,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=32,
        patch_size=2,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=8,
        fullatt_block_indexes=[1],
        tokens_per_second=2,
    )
    return InfiniteVLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        tie_word_embeddings=text["tie_word_embeddings"],
    )


def tiny_model(seed: int = 0, attn_implementation: str = "sdpa", **text_overrides) -> InfiniteVLForConditionalGeneration:
    torch.manual_seed(seed)
    config = tiny_config(**text_overrides)
    config._attn_implementation = attn_implementation
    model = InfiniteVLForConditionalGeneration(config).eval()
    # Larger decay/beta spread than the default init so the GDN state matters in short tests.
    return model


def text_ids(batch: int, length: int, seed: int = 1) -> torch.LongTensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 80, (batch, length), generator=generator)


def image_inputs(grid=(1, 4, 4), prefix: int = 5, suffix: int = 6, seed: int = 2, merge: int = 2, patch: int = 2):
    """One image of `grid` (t, h, w patches) inside text: input_ids [1, T], pixel_values, image_grid_thw."""
    generator = torch.Generator().manual_seed(seed)
    t, h, w = grid
    n_tokens = t * h * w // merge**2
    ids = torch.cat(
        [
            torch.randint(3, 80, (prefix,), generator=generator),
            torch.tensor([VISION_START]),
            torch.full((n_tokens,), IMAGE_TOKEN),
            torch.tensor([VISION_END]),
            torch.randint(3, 80, (suffix,), generator=generator),
        ]
    )[None]
    patch_dim = 3 * 2 * patch * patch  # channels * temporal_patch * patch * patch
    pixel_values = torch.randn(t * h * w, patch_dim, generator=generator)
    return ids, pixel_values, torch.tensor([list(grid)])


def run_under_triton_interpreter(script) -> str:
    """Run a test script in a subprocess with TRITON_INTERPRET=1 (it must be set before Triton is imported),
    with this package importable whether installed or not; its stdout once it exits 0."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import infinitevl_hf

    package_root = str(Path(infinitevl_hf.__file__).parents[1])
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


class CudaLike:
    """Stands in for a CUDA tensor in the fit checks (they read metadata only): a meta tensor's shape, dtype and
    strides, on `device`."""

    def __init__(self, t: torch.Tensor, device: str = "cuda:0"):
        for attr in ("shape", "dtype", "requires_grad", "stride", "is_contiguous", "dim"):
            setattr(self, attr, getattr(t, attr))
        self.is_cuda, self.device = True, torch.device(device)

    def get_device(self) -> int:
        return self.device.index


def set_current_cuda_device(monkeypatch, index: int) -> None:
    """Make the fit checks read `index` as the current CUDA device (on any build: the package reads it through
    `dispatch.current_cuda_device`, torch's own call where the build has no CUDA)."""
    from infinitevl_hf.modeling.ops import dispatch

    monkeypatch.setattr(dispatch, "_FAST_CURRENT_DEVICE", None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: index)
