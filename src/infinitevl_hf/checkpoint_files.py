"""Which safetensors files hold a checkpoint folder's tensors, checked before any weight is read.

A shard index can name files outside the folder, list shards that are missing, or place tensors in shards that
do not hold them; a shard can be truncated or not be safetensors at all. Each of these is refused here with a
`ValueError` (or `FileNotFoundError`) naming the file, instead of a raw error (or a read outside the folder)
deep inside loading. Only file headers are read: this is cheap for any checkpoint size.
"""

from __future__ import annotations

import json
from pathlib import Path

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"


def _keys(shard: Path) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(shard), "pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{shard} is not a readable safetensors file (corrupt or truncated): {error}") from error


def weight_files(folder: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, from the folder's index or its single file.

    Raises FileNotFoundError when the folder has neither (or an indexed shard is missing) and ValueError for an index
    that is not JSON, names a file outside the folder, or lists a tensor its shard does not hold, and for a file that
    is not readable safetensors."""
    folder = Path(folder)
    index = folder / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (ValueError, AttributeError) as error:
            raise ValueError(f"{index} is not a valid shard index: {error}") from error
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map.")
        root = folder.resolve()
        shards = sorted({str(s) for s in weight_map.values()})
        for shard in shards:
            if Path(shard).is_absolute() or not (root / shard).resolve().is_relative_to(root) or "/" in shard or "\\" in shard:
                raise ValueError(f"{index} names shard {shard!r}, which is not a file in the checkpoint folder.")
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} is missing {len(missing)} of the {len(shards)} shards its index lists: {missing}.")
        held = {shard: set(_keys(folder / shard)) for shard in shards}
        misplaced = [key for key, shard in weight_map.items() if key not in held[shard]]
        if misplaced:
            raise ValueError(f"{index} is mis-indexed: {len(misplaced)} tensors are not in the shard it names, "
                             f"e.g. {misplaced[:3]}.")
        return {key: folder / shard for key, shard in weight_map.items()}
    single = folder / SAFE_SINGLE
    if single.is_file():
        return {key: single for key in _keys(single)}
    if any(folder.glob(pattern) for pattern in ("*.bin", "*.pt", "*.pth")):
        raise ValueError(
            f"{folder} holds only pickled weights (*.bin); this package reads safetensors. Re-save the checkpoint with "
            "`model.save_pretrained(folder)` (transformers writes safetensors)."
        )
    raise FileNotFoundError(f"{folder} has neither {SAFE_INDEX} nor {SAFE_SINGLE}.")


__all__ = ["SAFE_INDEX", "SAFE_SINGLE", "weight_files"]
