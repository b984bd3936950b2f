"""Port a Qwen2.5-VL teacher checkpoint into the hybrid InfiniteVL layout (`convert_teacher`).

Steps: resolve the teacher (local folder or Hub id) -> check it is a safetensors Qwen2.5-VL checkpoint ->
plan every output tensor (name, shape, dtype, source) and check the plan against the names and shapes of
`InfiniteVLForConditionalGeneration` built on the meta device -> stream tensors one at a time from the
teacher's shards (`safe_open`, memory-mapped) into output shards of at most `max_shard_size` -> write
config.json and copy tokenizer/processor files -> re-read the output and check every copied tensor bit for
bit against the teacher -> swap the staged folder onto `out` (`infinitevl_hf.staged`).

Kept attention layers are copied unchanged; the others get Gated DeltaNet weights from
`gdn_init` (`attention-transfer`, `mimic` or `random`, see that module for the math).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..modeling.configuration_infinitevl import InfiniteVLConfig
from ..checkpoint_files import SAFE_INDEX, SAFE_SINGLE, weight_files
from ..staged import check_apart, check_replaceable, staged_folder
from . import gdn_init
from .mapping import EMBED_KEY, LM_HEAD_KEY, attention_key, classify, gdn_key, to_canonical

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ConversionError(ValueError):
    """The teacher, the options or the output folder cannot be converted; the message names the problem."""


@dataclass
class _Planned:
    name: str  # output (InfiniteVL) name
    shape: tuple[int, ...]
    dtype: torch.dtype
    teacher_key: str | None = None  # copied tensor: its key in the teacher checkpoint
    gdn_layer: int | None = None  # generated tensor: its Gated DeltaNet layer
    gdn_param: str | None = None

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


# ---------------------------------------------------------------------------------------------- inputs


def parse_attention_layers(spec: str | list[int] | tuple[int, ...], num_layers: int) -> list[int]:
    """`every:N` (layer i kept when i % N == 0), `all`, or an explicit list `0,4,8` -> sorted layer indices."""
    if isinstance(spec, (list, tuple)):
        layers = [int(i) for i in spec]
    else:
        text = str(spec).strip()
        if text == "all":
            return list(range(num_layers))
        match = re.fullmatch(r"every:(\d+)", text)
        if match:
            interval = int(match.group(1))
            if interval < 1:
                raise ConversionError(f"--attention-layers every:N needs N >= 1, got {text!r}.")
            return list(range(0, num_layers, interval))
        if not re.fullmatch(r"\d+(\s*,\s*\d+)*", text):
            raise ConversionError(
                f"--attention-layers must be 'every:N', 'all' or a comma-separated list of layer indices, got {text!r}."
            )
        layers = [int(i) for i in text.split(",")]
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ConversionError(f"--attention-layers names layers {bad}, but the teacher has layers 0..{num_layers - 1}.")
    if len(set(layers)) != len(layers):
        raise ConversionError(f"--attention-layers lists a layer twice: {layers}.")
    return sorted(layers)


def parse_size(size: int | str) -> int:
    """`"2GB"`, `"500MB"`, `"10KB"` or a byte count -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), flags=re.IGNORECASE)
    if not match:
        raise ConversionError(f"max_shard_size must be a byte count or like '2GB', got {size!r}.")
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(match.group(1)) * units[(match.group(2) or "").upper()])


def resolve_teacher(teacher: str | os.PathLike) -> Path:
    """A local folder as is; anything else that looks like `owner/name` is downloaded with `snapshot_download`."""
    path = Path(teacher).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConversionError(f"Teacher {teacher} is a file; pass the checkpoint folder.")
    if str(teacher).startswith((".", "/", "~")) or str(teacher).count("/") > 1 or os.sep != "/" and os.sep in str(teacher):
        raise ConversionError(f"Teacher folder not found: {str(teacher)!r}.")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(teacher)):
        raise ConversionError(f"Teacher {teacher} is neither an existing folder nor a Hugging Face Hub id (owner/name).")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.jinja"]  # weights are read from safetensors only
    return Path(snapshot_download(repo_id=str(teacher), allow_patterns=patterns))


def read_teacher_config(folder: Path) -> dict:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{folder} has no config.json, so it is not a Qwen2.5-VL checkpoint folder.")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ConversionError(f"{config_file} is not valid JSON: {error}.") from error
    model_type = config.get("model_type")
    if model_type != "qwen2_5_vl":
        raise ConversionError(
            f"{config_file} has model_type {model_type!r}; the converter reads Qwen2.5-VL teachers (model_type 'qwen2_5_vl')."
        )
    return config


def teacher_weight_files(folder: Path) -> dict[str, Path]:
    """Teacher tensor key -> safetensors file holding it, from the index or the single file (`checkpoint_files`)."""
    try:
        return weight_files(folder)
    except (ValueError, FileNotFoundError) as error:
        raise ConversionError(str(error)) from error


def build_target_config(
    teacher_config_folder: Path,
    kept_layers: list[int],
    window: int,
    dtype: torch.dtype | None,
    text_overrides: dict | None = None,
) -> InfiniteVLConfig:
    """InfiniteVLConfig from the teacher's: same text and vision fields, plus layer_types, window and GDN fields."""
    from transformers import Qwen2_5_VLConfig

    teacher = Qwen2_5_VLConfig.from_pretrained(teacher_config_folder)
    text = teacher.text_config.to_dict()
    vision = teacher.vision_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "dtype", "torch_dtype", "layer_types",
                "sliding_window", "use_sliding_window", "auto_map"):
        text.pop(key, None)
        vision.pop(key, None)
    num_layers = text["num_hidden_layers"]
    tie = bool(getattr(teacher, "tie_word_embeddings", text.get("tie_word_embeddings", False)))
    heads = text["num_attention_heads"]
    text.update(
        layer_types=["sliding_attention" if i in kept_layers else "linear_attention" for i in range(num_layers)],
        sliding_window=window,
        use_sliding_window=True,
        num_linear_heads=heads,
        num_linear_key_value_heads=heads,
        linear_head_dim=text["hidden_size"] // heads,
        tie_word_embeddings=tie,
    )
    text.update(text_overrides or {})
    special = {
        k: getattr(teacher, k)
        for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "vision_token_id")
        if getattr(teacher, k, None) is not None
    }
    try:
        config = InfiniteVLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **special)
    except ValueError as error:
        raise ConversionError(f"The converted config is invalid: {error}") from error
    config.architectures = ["InfiniteVLForConditionalGeneration"]
    if dtype is not None:
        config.dtype = dtype
    return config


# ---------------------------------------------------------------------------------------------- plan


def _plan(config: InfiniteVLConfig, key_files: dict[str, Path], dtype: torch.dtype | None) -> tuple[list[_Planned], dict]:
    """Every output tensor in write order, checked against the model's own parameter names and shapes."""
    text = config.text_config
    canonical_to_key: dict[str, str] = {}
    for key in key_files:
        canonical = to_canonical(key)
        if canonical in canonical_to_key:
            raise ConversionError(f"Teacher tensors {canonical_to_key[canonical]!r} and {key!r} name the same weight.")
        canonical_to_key[canonical] = key

    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    with contextlib.ExitStack() as stack:
        handles = {}
        for key, file in key_files.items():
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(file, "pt"))
            piece = handles[file].get_slice(key)
            shapes[key] = (tuple(piece.get_shape()), _torch_dtype(piece.get_dtype()))

    kept = {i for i, kind in enumerate(text.layer_types) if kind != "linear_attention"}
    plan: list[_Planned] = []
    unknown, dropped_biases = [], []
    for canonical, key in canonical_to_key.items():
        rule = classify(canonical)
        if rule is None:
            unknown.append(key)
            continue
        kind, groups = rule
        layer = int(groups["layer"]) if groups.get("layer") is not None else None
        if layer is not None and layer >= text.num_hidden_layers:
            unknown.append(key)
            continue
        if kind == "attention" and layer not in kept:
            if groups["kind"] == "bias":
                dropped_biases.append(key)
            continue
        if canonical == LM_HEAD_KEY and text.tie_word_embeddings:
            continue  # tied: the model ties it to the embeddings
        shape, source_dtype = shapes[key]
        plan.append(_Planned(canonical, shape, dtype or source_dtype, teacher_key=key))
    if unknown:
        raise ConversionError(f"The teacher holds {len(unknown)} tensors a Qwen2.5-VL checkpoint does not have, e.g. {unknown[:5]}.")

    gdn_layers = [i for i in range(text.num_hidden_layers) if i not in kept]
    for layer in gdn_layers:
        for proj in "qkvo":
            if attention_key(layer, proj) not in canonical_to_key:
                raise ConversionError(f"The teacher lacks {attention_key(layer, proj)!r} (layer {layer}'s attention).")
        for name, shape in gdn_init.gdn_parameter_shapes(text, layer).items():
            out_dtype = torch.float32 if name == "A_log" else (dtype or shapes[canonical_to_key[attention_key(layer, "q")]][1])
            plan.append(_Planned(gdn_key(layer, name), shape, out_dtype, gdn_layer=layer, gdn_param=name))

    plan.sort(key=_write_order)
    _check_against_model(config, plan)
    info = {"canonical_to_key": canonical_to_key, "dropped_biases": dropped_biases, "gdn_layers": gdn_layers}
    return plan, info


def _write_order(item: _Planned):
    match = re.match(r"^model\.language_model\.layers\.(\d+)\.", item.name)
    if item.name.startswith("model.visual."):
        return (0, 0, item.name)
    if item.name == EMBED_KEY:
        return (1, 0, item.name)
    if match:
        return (2, int(match.group(1)), item.name)
    return (3, 0, item.name)


def _check_against_model(config: InfiniteVLConfig, plan: list[_Planned]) -> None:
    from ..modeling.modeling_infinitevl import InfiniteVLForConditionalGeneration

    with torch.device("meta"):
        model = InfiniteVLForConditionalGeneration(config)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    if config.text_config.tie_word_embeddings:
        expected.pop(LM_HEAD_KEY, None)
    planned = {item.name: item.shape for item in plan}
    missing = sorted(set(expected) - set(planned))
    extra = sorted(set(planned) - set(expected))
    wrong = sorted(n for n in set(expected) & set(planned) if expected[n] != planned[n])
    problems = []
    if missing:
        problems.append(f"the teacher lacks {len(missing)} tensors the model needs, e.g. {missing[:5]}")
    if extra:
        problems.append(f"{len(extra)} tensors the model does not have, e.g. {extra[:5]}")
    if wrong:
        problems.append(f"{len(wrong)} tensors of the wrong shape, e.g. {[(n, planned[n], expected[n]) for n in wrong[:5]]}")
    if problems:
        raise ConversionError("The converted checkpoint would not match InfiniteVLForConditionalGeneration: " + "; ".join(problems) + ".")


def _torch_dtype(name: str) -> torch.dtype:
    table = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
    if name not in table:
        raise ConversionError(f"Unsupported safetensors dtype {name}.")
    return table[name]


def _assign_shards(plan: list[_Planned], max_bytes: int) -> list[list[_Planned]]:
    shards, current, size = [], [], 0
    for item in plan:
        if current and size + item.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += item.nbytes
    if current:
        shards.append(current)
    return shards


# ---------------------------------------------------------------------------------------------- write


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled)


def _write(tmp: Path, plan, key_files, config, init: str, seed: int, max_bytes: int, progress: bool) -> list[str]:
    text = config.text_config
    shards = _assign_shards(plan, max_bytes)
    names = (
        [SAFE_SINGLE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map, total = {}, 0
    current_layer, layer_params = None, {}
    with contextlib.ExitStack() as stack, _progress(len(plan), progress, "Converting") as bar:
        handles = {}

        def read(key: str) -> torch.Tensor:
            file = key_files[key]
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(file, "pt"))
            return handles[file].get_tensor(key)

        for shard_name, items in zip(names, shards):
            tensors = {}
            for item in items:
                if item.teacher_key is not None:
                    tensor = read(item.teacher_key).to(item.dtype)
                else:
                    if item.gdn_layer != current_layer:
                        current_layer = item.gdn_layer
                        layer_params = _gdn_params(text, item.gdn_layer, init, seed, read, key_files)
                    tensor = layer_params.pop(item.gdn_param).to(item.dtype)
                tensors[item.name] = tensor.contiguous()
                weight_map[item.name] = shard_name
                total += item.nbytes
                bar.update(1)
            save_file(tensors, str(tmp / shard_name), metadata={"format": "pt"})
            del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names


def _gdn_params(text, layer: int, init: str, seed: int, read, key_files) -> dict[str, torch.Tensor]:
    if init == "random":
        return gdn_init.random_init(text, layer, seed)
    if init == "mimic":
        return gdn_init.mimic_init(text, layer, seed)
    canonical_to_key = {to_canonical(k): k for k in key_files}
    teacher = {proj: read(canonical_to_key[attention_key(layer, proj)]) for proj in "qkvo"}
    return gdn_init.attention_transfer_init(text, layer, teacher, text.num_key_value_heads, seed)


def _verify(tmp: Path, plan: list[_Planned], key_files: dict[str, Path], shard_names: list[str], progress: bool) -> None:
    """Re-read the written shards: every planned tensor is there with its shape and dtype, and every copied
    tensor equals the teacher's bit for bit (after the cast to the output dtype)."""
    by_name = {item.name: item for item in plan}
    seen = set()
    with contextlib.ExitStack() as stack, _progress(len(plan), progress, "Verifying") as bar:
        teacher_handles = {}
        for shard in shard_names:
            with safe_open(tmp / shard, "pt") as f:
                for name in f.keys():
                    item = by_name.get(name)
                    if item is None or name in seen:
                        raise ConversionError(f"Verification failed: {shard} holds an unplanned or repeated tensor {name!r}.")
                    seen.add(name)
                    written = f.get_tensor(name)
                    if tuple(written.shape) != item.shape or written.dtype != item.dtype:
                        raise ConversionError(f"Verification failed: {name} was written as {written.dtype} {tuple(written.shape)}.")
                    if item.teacher_key is not None:
                        file = key_files[item.teacher_key]
                        if file not in teacher_handles:
                            teacher_handles[file] = stack.enter_context(safe_open(file, "pt"))
                        source = teacher_handles[file].get_tensor(item.teacher_key).to(item.dtype)
                        if not _same_bits(written, source):
                            raise ConversionError(f"Verification failed: {name} differs from the teacher's {item.teacher_key}.")
                    bar.update(1)
    missing = sorted(set(by_name) - seen)
    if missing:
        raise ConversionError(f"Verification failed: {len(missing)} tensors were not written, e.g. {missing[:5]}.")


def _copy_side_files(teacher: Path, tmp: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (teacher / name).is_file():
            shutil.copy2(teacher / name, tmp / name)
            copied.append(name)
    return copied


def _export_hooks(folder: Path, info: dict) -> list[str]:
    """A "converted" model card (written first, so the remote-code export keeps it) and the trust_remote_code files."""
    from .. import cards, export

    cards.write_model_card(folder, kind="converted", **info)
    export.write_remote_code(folder)
    return ["model_card", "remote_code"]


# ---------------------------------------------------------------------------------------------- entry point


def convert_teacher(
    teacher: str | os.PathLike,
    out: str | os.PathLike,
    *,
    attention_layers: str | list[int] = "every:4",
    window: int = 8192,
    init: str = "attention-transfer",
    dtype: str | None = "bfloat16",
    force: bool = False,
    max_shard_size: int | str = "2GB",
    seed: int = 0,
    text_overrides: dict | None = None,
    progress: bool = True,
    hooks: bool = True,
) -> Path:
    """Convert a Qwen2.5-VL checkpoint (local folder or Hub id) into an InfiniteVL checkpoint folder `out`.

    Args:
        teacher: folder with config.json (model_type `qwen2_5_vl`) and safetensors weights (single file or
            sharded with `model.safetensors.index.json`; legacy `visual.*`/`model.layers.*` or transformers-5
            `model.visual.*`/`model.language_model.*` names; tied or untied lm_head), or a Hub id.
        out: output folder; must not exist unless `force` (then it is replaced only after success).
        attention_layers: layers kept as (sliding-window) attention: `"every:4"` (i % 4 == 0), `"all"`, `"0,4,8"`
            or a list of ints. The others become Gated DeltaNet layers.
        window: `sliding_window` of the kept attention layers, in tokens.
        init: Gated DeltaNet start: `"attention-transfer"`, `"mimic"` or `"random"` (see `gdn_init`).
        dtype: `"bfloat16"`, `"float16"`, `"float32"`, or None / `"auto"` to keep the teacher's dtypes.
            `A_log` is always float32, as in the official release.
        max_shard_size: largest output shard, bytes or like `"2GB"`.
        seed: seed of the random parts of the Gated DeltaNet init (layer i uses `seed + i`).
        text_overrides: extra text-config fields (e.g. `{"expand_v": 2, "conv_size": 4}`).
        progress: show tqdm progress bars.
        hooks: call `infinitevl_hf.export.write_remote_code` / `infinitevl_hf.cards.write_model_card` if they exist.

    Returns the output folder. Raises `ConversionError` (a ValueError) naming the problem; nothing is left on
    disk then.

    Example:

    ```python
    >>> from infinitevl_hf.conversion import convert_teacher
    >>> convert_teacher("Qwen/Qwen2.5-VL-3B-Instruct", "InfiniteVL-3B-init", dtype="bfloat16")  # doctest: +SKIP
    ```
    """
    if init not in gdn_init.INIT_STRATEGIES:
        raise ConversionError(f"init must be one of {gdn_init.INIT_STRATEGIES}, got {init!r}.")
    if dtype in (None, "auto"):
        torch_dtype = None
    elif dtype in DTYPES:
        torch_dtype = DTYPES[dtype]
    else:
        raise ConversionError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {dtype!r}.")
    if int(window) < 1:
        raise ConversionError(f"window must be a positive number of tokens, got {window}.")
    max_bytes = parse_size(max_shard_size)
    out = Path(out).expanduser().absolute()
    if out.exists() and not force:
        raise ConversionError(f"Output folder {out} already exists; pass force=True (--force) to replace it.")
    if not out.parent.is_dir():
        raise ConversionError(f"The parent folder of {out} does not exist.")

    folder = resolve_teacher(teacher)
    try:  # before any work: an output that is, holds or lies in the teacher, or a folder that is not ours
        check_apart(out, [folder], what="output folder")
        check_replaceable(out, force, what="Output folder", flag="force=True (--force)")
    except (ValueError, FileExistsError) as error:
        raise ConversionError(str(error)) from error
    teacher_config = read_teacher_config(folder)
    key_files = teacher_weight_files(folder)
    text_cfg = teacher_config.get("text_config") or teacher_config
    num_layers = int(text_cfg["num_hidden_layers"])
    kept = parse_attention_layers(attention_layers, num_layers)
    config = build_target_config(folder, kept, int(window), torch_dtype, text_overrides)
    if init == "attention-transfer" and "linear_attention" in config.text_config.layer_types:
        try:
            gdn_init.check_attention_transfer(config.text_config)
        except ValueError as error:
            raise ConversionError(str(error)) from error
    plan, info = _plan(config, key_files, torch_dtype)

    with staged_folder(out, overwrite=force, sources=[folder], what="Output folder", flag="force=True (--force)") as tmp:
        shard_names = _write(tmp, plan, key_files, config, init, seed, max_bytes, progress)
        config.save_pretrained(tmp)
        side_files = _copy_side_files(folder, tmp)
        _verify(tmp, plan, key_files, shard_names, progress)
        if hooks:
            base_model = str(teacher) if not Path(teacher).expanduser().exists() else folder.resolve().name
            notes = (
                f"Conversion: layers {kept} kept as sliding-window attention (window {int(window)} tokens), "
                f"{len(info['gdn_layers'])} Gated DeltaNet layers initialised with `{init}`"
                + (f"; the teacher's q/k/v biases of those layers ({len(info['dropped_biases'])} tensors) are dropped."
                   if info["dropped_biases"] else ".")
            )
            _export_hooks(
                tmp,
                dict(
                    config=config,
                    base_model=base_model,
                    title=f"{out.name} (InfiniteVL conversion of {base_model})",
                    notes=notes,
                    teacher=str(teacher),
                    attention_layers=kept,
                    window=int(window),
                    init=init,
                    dtype=str(torch_dtype or "auto").replace("torch.", ""),
                    gdn_layers=info["gdn_layers"],
                    copied_files=side_files,
                ),
            )
    return out


__all__ = ["ConversionError", "convert_teacher", "parse_attention_layers", "parse_size", "TOKENIZER_FILES"]
