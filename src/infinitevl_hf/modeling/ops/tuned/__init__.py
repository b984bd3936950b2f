"""Autotuning choices of fla's Triton kernels recorded on known GPUs, so that a machine that never ran the model
skips the autotuning.

fla's prompt kernels autotune on their first call for each (kernel, tuning key): on an H200 with an empty Triton
cache that took 80 s of a 108 s first `generate()` (91 candidate configs, each compiled and timed). Triton keeps
the winners on disk, so only the first process of a machine pays, but a fresh container pays it again.
`benchmarks/record_tuned_kernels.py` records the winners after a warm-up on one GPU into ``<gpu name>.json``
here; `seed_autotuners()` gives them back to each kernel's autotuner before its first call, as Triton's own disk
cache would in a later process.

A recorded choice is used only where the GPU name, the fla and Triton versions and fla's environment switches
(``FLA_*``, which select kernel variants the tuning key does not show) all match the recording, for the exact
tuning key it was recorded under, and only when it is one of the kernel's own candidate configs (the autotuner
would have picked among them). Anything else autotunes as before. ``INFINITEVL_TUNED_KERNELS=0``
turns seeding off; so does fla's own config cache (``FLA_CACHE_MODE``), which then decides. A checkpoint's
trust_remote_code files carry no recordings: without this package installed, the kernels autotune.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import sys
from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger(__name__)

TUNED_DIR = Path(__file__).parent
SWITCH_ENV = "INFINITEVL_TUNED_KERNELS"
FORMAT = 1


def recording_path(gpu_name: str, directory: Path | None = None) -> Path:
    """Where the choices recorded on `gpu_name` live: ``nvidia_h200.json`` for "NVIDIA H200" (in this folder)."""
    return (TUNED_DIR if directory is None else Path(directory)) / (re.sub(r"[^0-9a-z]+", "_", gpu_name.lower()).strip("_") + ".json")


def _autotuner_in(obj):
    """The Triton autotuner inside a module attribute (a kernel may sit under `triton.heuristics`), or None."""
    from triton.runtime.autotuner import Autotuner

    for _ in range(4):
        if isinstance(obj, Autotuner):
            return obj
        obj = getattr(obj, "fn", None)
        if obj is None:
            return None
    return None


def _kernel_name(autotuner) -> str:
    """``module:function`` of the Triton function an autotuner tunes (stable across processes)."""
    return f"{autotuner.base_fn.__module__}:{autotuner.base_fn.__name__}"


def autotuners(prefix: str = "fla.") -> dict[str, object]:
    """Every autotuner in the imported modules under `prefix`, by ``module:function``."""
    found = {}
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith(prefix):
            continue
        for value in list(vars(module).values()):
            autotuner = _autotuner_in(value)
            if autotuner is not None:
                found.setdefault(_kernel_name(autotuner), autotuner)
    return found


def _fla_env() -> dict[str, str]:
    """fla's environment switches in effect (they change which kernel variant a config runs)."""
    return {name: value for name, value in sorted(os.environ.items()) if name.startswith("FLA_")}


def _config_record(config) -> dict:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages,
            "num_ctas": getattr(config, "num_ctas", 1), "maxnreg": getattr(config, "maxnreg", None)}


def _versions() -> tuple[str, str]:
    import triton

    try:
        import fla

        fla_version = fla.__version__
    except ImportError:
        fla_version = "none"
    return fla_version, triton.__version__


def record(gpu_name: str, path: Path | None = None, prefix: str = "fla.") -> Path:
    """Write every choice the autotuners under `prefix` hold now (after a warm-up) to `path` (default: this
    package's file for `gpu_name`), atomically. Returns the path."""
    fla_version, triton_version = _versions()
    kernels = {}
    for name, autotuner in sorted(autotuners(prefix).items()):
        entries = [{"key": list(key), "config": _config_record(config)} for key, config in autotuner.cache.items()
                   if getattr(config, "pre_hook", None) is None and getattr(config, "ir_override", None) is None]
        if entries:
            kernels[name] = sorted(entries, key=lambda entry: json.dumps(entry["key"]))
    path = Path(path) if path is not None else recording_path(gpu_name)
    body = {"format": FORMAT, "gpu": gpu_name, "fla": fla_version, "triton": triton_version, "fla_env": _fla_env(),
            "kernels": kernels}
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        staging.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)  # a failed write leaves no half-written file behind
    return path


def _matching_config(autotuner, wanted: dict):
    """The autotuner's own candidate equal to the recorded config, or None."""
    for config in autotuner.configs:
        if _config_record(config) == wanted and getattr(config, "ir_override", None) is None:
            return config
    return None


def seed(recording: dict, gpu_name: str) -> tuple[int, str | None]:
    """Hand the choices of `recording` to the autotuners of the modules it names: (choices seeded, why none was
    seeded or None). A key an autotuner already holds is left as it is."""
    fla_version, triton_version = _versions()
    wanted = (recording.get("format"), recording.get("gpu"), recording.get("fla"), recording.get("triton"))
    if wanted != (FORMAT, gpu_name, fla_version, triton_version):
        return 0, (f"recorded for {wanted[1]} with fla {wanted[2]} and Triton {wanted[3]}; this is {gpu_name} with "
                   f"fla {fla_version} and Triton {triton_version}")
    if recording.get("fla_env", {}) != _fla_env():
        return 0, f"recorded with fla's switches {recording.get('fla_env', {})}, set here: {_fla_env()}"
    seeded = 0
    for name, entries in recording.get("kernels", {}).items():
        module_name, _, function = name.partition(":")
        try:
            autotuner = _autotuner_in(getattr(importlib.import_module(module_name), function, None))
        except Exception:  # a module this fla does not have: nothing to seed
            continue
        if autotuner is None or _kernel_name(autotuner) != name:
            continue
        for entry in entries:
            try:
                key, config = tuple(entry["key"]), _matching_config(autotuner, entry["config"])
                hash(key)
            except (KeyError, TypeError):  # a malformed entry: that kernel autotunes that key
                continue
            if config is not None and key not in autotuner.cache:
                autotuner.cache[key] = config
                seeded += 1
    return seeded, None


def seeding_problem() -> str | None:
    """Why recorded choices are not seeded in this process, or None."""
    if os.environ.get(SWITCH_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"{SWITCH_ENV} is off"
    fla_cache = sys.modules.get("fla.ops.utils.cache")  # fla reads FLA_CACHE_MODE once, at import
    mode = getattr(getattr(fla_cache, "FLA_CACHE_MODE", None), "value", None)
    if (mode or os.environ.get("FLA_CACHE_MODE", "disabled")).strip().lower() != "disabled":
        return "FLA_CACHE_MODE is set (fla's own config cache decides)"
    return None


@functools.lru_cache(maxsize=None)
def seed_autotuners(gpu_name: str) -> int:
    """Seed fla's autotuners once per process and GPU name with what was recorded there; the count seeded.
    Called by the fla kernel loaders; says (once, at info level) what it did."""
    problem = seeding_problem()
    path = recording_path(gpu_name)
    if problem is None and not path.is_file():
        problem = f"nothing was recorded on {gpu_name}"
    if problem is None:
        try:
            recording = json.loads(path.read_text())
            if not isinstance(recording, dict) or not isinstance(recording.get("kernels", {}), dict):
                raise ValueError("not a recording")
            count, problem = seed(recording, gpu_name)
        except (OSError, ValueError, TypeError, AttributeError) as error:
            count, problem = 0, f"{path.name} is unreadable ({type(error).__name__}: {error})"
    if problem is not None:
        logger.info(f"fla kernels autotune on first use: {problem}.")
        return 0
    logger.info(f"fla kernels: {count} autotuning choices recorded on {gpu_name} seeded from {path.name}.")
    return count


def seed_for_current_device() -> int:
    """`seed_autotuners` for the current CUDA device (0 where CUDA or Triton is absent)."""
    import torch

    if not torch.cuda.is_available():
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        return 0
    try:
        return seed_autotuners(torch.cuda.get_device_name())
    except Exception as error:  # seeding only saves time: the kernels then autotune, as without it
        logger.warning_once(f"fla kernels autotune on first use: seeding their recorded choices failed "
                            f"({type(error).__name__}: {error}).")
        return 0
