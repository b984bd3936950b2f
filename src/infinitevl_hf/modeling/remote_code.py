"""Write the model code into a checkpoint folder as flat trust_remote_code files.

transformers' dynamic-module loader copies a checkpoint's code files into one flat package and
follows only single-dot relative imports of files at the folder root. This package's modeling code
lives in nested sub-packages (`ops/gated_delta_rule/reference.py`), so each file is written under a
flat name made of its path parts (`ops_gated_delta_rule_reference.py`; a package's `__init__.py`
takes the package's name: `ops.py`) and its relative imports are rewritten to match, e.g.
``..dispatch`` inside `ops/gated_delta_rule/__init__.py` becomes ``.ops_dispatch``.

The files to write are found by following relative imports from the entry files
(`configuration_infinitevl.py` and `modeling_infinitevl.py` for the model,
`processing/processing_infinitevl.py` for the processor). This file is imported by the modeling
file, so it is written too: a model loaded with trust_remote_code can save itself again. There it
runs on the flat files, which it copies unchanged. It reads the processor's source as a file and
never imports it: modeling code imports only torch, transformers and modeling files.
"""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

# Entry modules, as path parts under the package root (`infinitevl_hf/`), and the files they need.
MODEL_ENTRIES = (("modeling", "configuration_infinitevl"), ("modeling", "modeling_infinitevl"))
PROCESSOR_ENTRIES = (("processing", "processing_infinitevl"),)
# Leading folders dropped from flat names: `modeling/ops/dispatch.py` -> `ops_dispatch.py`.
_FLAT_DROPS = ("modeling", "processing")

# The class names resolvable through `auto_map`. The official release names its model class
# `InfiniteVLQwen2_5_VLForConditionalGeneration`; the modeling file defines it as an alias subclass.
MODEL_CLASS = "modeling_infinitevl.InfiniteVLForConditionalGeneration"
AUTO_MAP = {
    "AutoConfig": "configuration_infinitevl.InfiniteVLConfig",
    "AutoModel": MODEL_CLASS,
    "AutoModelForCausalLM": MODEL_CLASS,
    "AutoModelForImageTextToText": MODEL_CLASS,
}
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_infinitevl.InfiniteVLProcessor"}

_HERE = Path(__file__).resolve().parent
# `from <dots><module> import`, at the start of a line (the form transformers' loader reads).
_FROM_IMPORT = re.compile(r"^(?P<indent>\s*)from\s+(?P<dots>\.+)(?P<module>[\w.]*)\s+import\b")
# transformers' own pattern for the relative imports it will look for as files.
_LOADER_PATTERN = re.compile(r"^\s*from\s+\.(\S+)\s+import", flags=re.MULTILINE)


def flat_name(parts: tuple[str, ...]) -> str:
    """Flat module name of a module given by its path parts under the package root
    (`("modeling", "ops", "dispatch")` -> `ops_dispatch`, `("modeling", "ops", "__init__")` -> `ops`)."""
    parts = tuple(p for p in parts if p != "__init__")
    if parts and parts[0] in _FLAT_DROPS:
        parts = parts[1:]
    if not parts:
        raise ValueError("a package root cannot be a remote-code file")
    return "_".join(parts)


def resolve_relative(module_parts: tuple[str, ...], is_package: bool, level: int, module: str) -> tuple[str, ...]:
    """Path parts of the module named by a relative import.

    `module_parts` are the importing module's parts (`("modeling", "ops", "gated_delta_rule")` for
    `modeling/ops/gated_delta_rule/__init__.py`, with `is_package=True`); `level` is the number of dots.
    """
    package = list(module_parts) if is_package else list(module_parts[:-1])
    if level - 1 > len(package):
        raise ValueError(f"relative import with {level} dots goes above the package root from {module_parts}")
    base = package[: len(package) - (level - 1)]
    return tuple(base + [p for p in module.split(".") if p])


def flatten_relative_imports(source: str, module_parts: tuple[str, ...], is_package: bool = False) -> str:
    """Rewrite every relative import of `source` to a single-dot import of the flat file name.

    Only real import statements are touched (found with `ast`, so docstrings are left alone).
    ``from . import x`` and imports split before ``import`` are refused: the loader cannot follow them.
    """
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        where = f"line {node.lineno} of {'/'.join(module_parts)}"
        if not node.module:
            raise ValueError(f"`from . import name` ({where}) cannot be flattened; import from the module instead")
        line = lines[node.lineno - 1]
        match = _FROM_IMPORT.match(line)
        if match is None:
            raise ValueError(f"relative import at {where} must read `from .module import ...` on one line")
        target = flat_name(resolve_relative(module_parts, is_package, node.level, node.module))
        lines[node.lineno - 1] = f"{match['indent']}from .{target} import" + line[match.end():]
    return "".join(lines)


def _package_mode() -> bool:
    """True when running from the installed package (nested layout), False inside a flat checkpoint folder."""
    return (_HERE / "ops" / "__init__.py").is_file()


def _source_path(parts: tuple[str, ...]) -> tuple[Path, bool]:
    """File of the module given by its parts under the package root, and whether it is a package."""
    root = _HERE.parent
    package_init = root.joinpath(*parts, "__init__.py")
    if package_init.is_file():
        return package_init, True
    return root.joinpath(*parts[:-1], parts[-1] + ".py"), False


def remote_code_files(entries: tuple[tuple[str, ...], ...] = MODEL_ENTRIES) -> dict[str, str]:
    """`{flat file name: file content}` of the entry modules and every module they import, imports made flat."""
    files: dict[str, str] = {}
    if _package_mode():
        todo = list(entries)
        origin: dict[str, tuple[str, ...]] = {}
        while todo:
            parts = todo.pop()
            name = flat_name(parts) + ".py"
            if name in files:
                if origin[name] != parts:
                    raise ValueError(f"modules {origin[name]} and {parts} both flatten to {name}")
                continue
            path, is_package = _source_path(parts)
            source = path.read_text(encoding="utf-8")
            files[name] = flatten_relative_imports(source, parts, is_package)
            origin[name] = parts
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.ImportFrom) and node.level > 0 and node.module:
                    todo.append(resolve_relative(parts, is_package, node.level, node.module))
    else:
        todo = [flat_name(parts) + ".py" for parts in entries]
        while todo:
            name = todo.pop()
            if name in files:
                continue
            files[name] = (_HERE / name).read_text(encoding="utf-8")
            todo.extend(f"{m}.py" for m in _LOADER_PATTERN.findall(files[name]))
    _check_self_contained(files)
    return files


def _check_self_contained(files: dict[str, str]) -> None:
    """Every relative import the loader will look for is among `files`, and nothing imports the package."""
    for name, content in files.items():
        for module in _LOADER_PATTERN.findall(content):
            if f"{module}.py" not in files:
                raise ValueError(f"remote-code file {name} imports `.{module}`, which is not written to the checkpoint")
        for node in ast.walk(ast.parse(content)):
            absolute = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            if any(m.split(".")[0] == "infinitevl_hf" for m in absolute):
                raise ValueError(f"remote-code file {name} imports `infinitevl_hf`, which a checkpoint cannot rely on")


def set_auto_map(config) -> None:
    """Point `config.auto_map` (and its sub-configs') at the remote-code files, keeping entries for other Auto classes."""
    auto_map = dict(getattr(config, "auto_map", None) or {})
    auto_map.update(AUTO_MAP)
    config.auto_map = auto_map


def _write_files(folder: Path, files: dict[str, str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in sorted(files.items()):
        path = folder / name
        path.write_text(content, encoding="utf-8")
        written.append(path)
    return written


def write_remote_code(folder: str | os.PathLike) -> list[Path]:
    """Write the model's flat remote-code files into `folder` (created if needed); return their paths.

    The folder's `config.json` must also carry `auto_map` (see `set_auto_map`); the model's
    `save_pretrained` does both.
    """
    return _write_files(Path(folder), remote_code_files(MODEL_ENTRIES))


def write_processor_remote_code(folder: str | os.PathLike) -> list[Path]:
    """Write `processing_infinitevl.py` (and the modeling files it imports) into `folder` and add
    `auto_map["AutoProcessor"]` to the folder's `processor_config.json` when that file exists."""
    folder = Path(folder)
    written = _write_files(folder, remote_code_files(PROCESSOR_ENTRIES))
    processor_config = folder / "processor_config.json"
    if processor_config.is_file():
        data = json.loads(processor_config.read_text(encoding="utf-8"))
        data["auto_map"] = {**data.get("auto_map", {}), **PROCESSOR_AUTO_MAP}
        processor_config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return written


# Set by the installed package (`infinitevl_hf.export`) to write a README.md model card on save. It stays
# None in a checkpoint loaded with trust_remote_code, where no card template is at hand.
_card_writer = None


def set_card_writer(writer) -> None:
    """Install `writer(folder, config)`, called by `write_model_card`; None removes it."""
    global _card_writer
    _card_writer = writer


def write_model_card(folder: str | os.PathLike, config) -> Path | None:
    """Write `folder/README.md` with the installed card writer unless the file exists; return its path or None."""
    readme = Path(folder) / "README.md"
    if _card_writer is None or readme.exists():
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    _card_writer(folder, config)
    return readme


__all__ = [
    "AUTO_MAP",
    "MODEL_ENTRIES",
    "PROCESSOR_ENTRIES",
    "PROCESSOR_AUTO_MAP",
    "flat_name",
    "flatten_relative_imports",
    "remote_code_files",
    "resolve_relative",
    "set_auto_map",
    "set_card_writer",
    "write_model_card",
    "write_processor_remote_code",
    "write_remote_code",
]
