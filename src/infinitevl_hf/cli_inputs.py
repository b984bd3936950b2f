"""Checks of what a user passes to the `infinitevl` command, each failing with one line that names the problem.

A local path that does not exist is "folder not found" (not a Hub repo-id error); a device is checked before any
model is built; a checkpoint is checked to be InfiniteVL and its safetensors files readable before weights load.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from .staged import MARKER


def looks_local(name: str) -> bool:
    """Whether `name` means a folder on this machine rather than a Hub id (`owner/name`)."""
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists() or name.count("/") != 1


def resolve_checkpoint(name: str, what: str = "model") -> str:
    """A local checkpoint folder (as a string) or a Hub id; a local path that is not a folder is refused by name."""
    if looks_local(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{what} folder not found: {name!r}")
        return str(path)
    return name


def check_device(name: str | None) -> str:
    """The torch device to use (default: cuda when available, else cpu); unknown or unavailable ones are refused."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown --device {name!r}: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here (torch {torch.__version__}"
                             f"{', built without CUDA' if torch.version.cuda is None else ', no GPU visible'}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA devices are visible")
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: this package runs on cpu, cuda or mps")
    return name


def check_infinitevl(name: str) -> None:
    """Refuse a checkpoint that is not InfiniteVL (e.g. a plain Qwen2.5-VL folder) and, for a local folder, one whose
    safetensors files are missing, corrupt, mis-indexed or point outside it."""
    from .checkpoint_files import weight_files
    from .modeling import InfiniteVLConfig

    if Path(name).is_dir():
        config_file = Path(name) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{name!r} is not a checkpoint folder: it has no config.json")
        try:
            model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
        except (ValueError, AttributeError) as error:
            raise ValueError(f"{config_file} is not valid JSON: {error}") from error
    else:
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(name).model_type
    if model_type != InfiniteVLConfig.model_type:
        hint = " (convert it first: infinitevl convert --teacher ...)" if model_type == "qwen2_5_vl" else ""
        raise ValueError(f"{name!r} is not an InfiniteVL checkpoint: its model_type is {model_type!r}, "
                         f"expected {InfiniteVLConfig.model_type!r}{hint}")
    if Path(name).is_dir():
        weight_files(name)


def is_random_tiny(name: str) -> bool:
    """Whether `name` is a tiny random-weight checkpoint written by `tiny_checkpoint` (its answers mean nothing)."""
    try:
        return json.loads((Path(name) / MARKER).read_text(encoding="utf-8")).get("kind") == "tiny-checkpoint"
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def quiet_loading(quiet: bool) -> Iterator[None]:
    """With `quiet`, silence transformers' and huggingface_hub's progress bars (loading, writing shards)."""
    if not quiet:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hub_was_off = are_progress_bars_disabled()
    bars_were_on = hf_logging.is_progress_bar_enabled()
    disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
        if not hub_was_off:
            enable_progress_bars()


__all__ = ["check_device", "check_infinitevl", "is_random_tiny", "looks_local", "quiet_loading", "resolve_checkpoint"]
