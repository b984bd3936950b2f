"""Self-contained checkpoints: model code as flat trust_remote_code files, `auto_map`, and a model card.

`InfiniteVLPreTrainedModel.save_pretrained` already writes the model's code files and `config.auto_map`
(see `modeling/remote_code.py`). This module adds what needs the installed package: the processor's code
file, the README.md model card, and `export_checkpoint` for turning any checkpoint folder into one that
loads with `trust_remote_code=True` where `infinitevl_hf` is not installed:

```python
>>> from infinitevl_hf.export import export_checkpoint
>>> export_checkpoint("path/to/InfiniteVL-4B", "exported/")  # then, anywhere:
>>> # AutoModelForImageTextToText.from_pretrained("exported/", trust_remote_code=True)
```
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .modeling.remote_code import (
    AUTO_MAP,
    MODEL_ENTRIES,
    PROCESSOR_AUTO_MAP,
    PROCESSOR_ENTRIES,
    remote_code_files,
    set_card_writer,
    write_processor_remote_code,
)
from .modeling.remote_code import write_remote_code as write_model_remote_code
from .staged import staged_folder


def _card_writer(folder, config) -> None:
    from .cards import save_pretrained_card_writer

    save_pretrained_card_writer(folder, config)


def install_card_writer() -> None:
    """Make `save_pretrained` write a README.md model card into folders that have none (done on import)."""
    set_card_writer(_card_writer)


install_card_writer()


def write_remote_code(folder: str | os.PathLike, card_kind: str = "checkpoint", **card_info) -> list[Path]:
    """Make an existing checkpoint folder self-contained, in place; return the files written.

    Writes the model's flat code files and sets `auto_map` in `config.json`; when the folder has a processor
    (`processor_config.json`), writes `processing_infinitevl.py` and its `auto_map["AutoProcessor"]`; writes a
    README.md model card of `card_kind` when there is none. Running it twice gives the same folder.
    """
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} is not a checkpoint folder: it has no config.json.")
    written = write_model_remote_code(folder)
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["auto_map"] = {**config.get("auto_map", {}), **AUTO_MAP}
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if (folder / "processor_config.json").is_file():
        written += write_processor_remote_code(folder)
    readme = folder / "README.md"
    if not readme.exists():
        from .cards import write_model_card
        from .modeling import InfiniteVLConfig

        written.append(write_model_card(folder, card_kind, config=InfiniteVLConfig.from_pretrained(folder), **card_info))
    return written


def strip_foreign_code(folder: str | os.PathLike) -> list[str]:
    """Remove from `folder` every code file and `auto_map` entry that is not this package's; return what was removed.

    A folder loaded with `trust_remote_code=True` runs whatever its `.py` files and `auto_map` entries name, so an
    export carries only the files `write_remote_code` writes: other `.py` files anywhere in the folder are deleted,
    and `auto_map` entries (in any top-level JSON file: config, tokenizer, processor) that name another module or
    another repository's code (`repo--module.Class`) are dropped."""
    folder = Path(folder)
    ours = {*remote_code_files(MODEL_ENTRIES), *remote_code_files(PROCESSOR_ENTRIES)}
    ours_modules = {name[: -len(".py")] for name in ours}
    removed = []
    for path in sorted(folder.rglob("*.py")):
        if path.parent == folder and path.name in ours:
            continue
        path.unlink()
        removed.append(f"code file {path.relative_to(folder).as_posix()}")
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            continue
        if not isinstance(data, dict) or not isinstance(data.get("auto_map"), dict):
            continue
        kept = {}
        for key, value in data["auto_map"].items():
            targets = value if isinstance(value, (list, tuple)) else [value]
            foreign = [t for t in targets if t is not None and (not isinstance(t, str) or t.split(".")[0] not in ours_modules)]
            if foreign:
                removed.append(f"{path.name} auto_map[{key!r}] -> {', '.join(map(str, foreign))}")
            else:
                kept[key] = value
        if kept != data["auto_map"]:
            if kept:
                data["auto_map"] = kept
            else:
                del data["auto_map"]
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return removed


def export_checkpoint(source: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False,
                      card_kind: str = "checkpoint", dropped: list[str] | None = None, **card_info) -> Path:
    """Copy the checkpoint folder `source` to `output` and make the copy self-contained (`write_remote_code`).

    Weights and processor files are copied as they are (both key namings of the official release load); code that
    is not this package's is left out (`strip_foreign_code`; what was left out is appended to `dropped`). Refuses an
    `output` that is, contains or lies inside `source`, and an existing non-empty `output` unless `overwrite` and
    it is a folder this package wrote; the folder appears whole or not at all (`staged.staged_folder`).
    """
    source, output = Path(source).expanduser(), Path(output).expanduser()
    if not source.is_dir():
        raise FileNotFoundError(f"Checkpoint folder not found: {str(source)!r}.")
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{str(source)!r} is not a checkpoint folder: it has no config.json.")
    with staged_folder(output, overwrite=overwrite, sources=[source], kind="export") as staging:
        for item in source.iterdir():
            if item.name.startswith(".") or item.name == "__pycache__":
                continue
            target = staging / item.name
            shutil.copytree(item, target) if item.is_dir() else shutil.copy2(item, target)
        removed = strip_foreign_code(staging)
        write_remote_code(staging, card_kind=card_kind, **card_info)
    if dropped is not None:
        dropped.extend(removed)
    return output


__all__ = ["AUTO_MAP", "PROCESSOR_AUTO_MAP", "export_checkpoint", "install_card_writer", "strip_foreign_code", "write_remote_code"]
