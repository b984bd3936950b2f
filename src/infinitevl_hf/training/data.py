"""Conversation data for distillation and fine-tuning: local JSON/JSONL files -> processor inputs with labels.

Two record layouts are read:

* messages (the transformers chat format)::

      {"messages": [{"role": "user", "content": [{"type": "image", "image": "cat.png"}, {"type": "text", "text": "What is it?"}]},
                    {"role": "assistant", "content": "A cat."}]}

* ShareGPT / LLaVA::

      {"image": "cat.png", "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]}

  (`image` may also be `images`, a list; each `<image>` marker takes the next one; `human`/`user` map to
  `user`, `gpt`/`assistant` to `assistant`, `system` stays.)

Image paths are read relative to `image_root` (default: the data file's folder). Every record goes through
the processor's chat template; the labels keep only the assistant replies (each through its `<|im_end|>`),
so prompt, system, image and padding tokens carry no loss.

A record that cannot be used (image file missing or unreadable, no assistant turn, `<image>` markers that
do not match the images, longer than `max_length`, ...) is a *bad sample*: with `on_bad_sample="raise"` it
stops the run with a `BadSampleError` naming its index; with `"skip"` it is left out, logged, and listed in
`dataset.skipped` as `(index, reason)`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
IMAGE_MARKER = "<image>"
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
ASSISTANT_HEADER = "<|im_start|>assistant\n"
TURN_END = "<|im_end|>"


class BadSampleError(ValueError):
    """A data record that cannot be trained on; `index` is its position in the data file."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"Bad sample {index}: {reason}")
        self.index = index
        self.reason = reason


def read_records(path: str | os.PathLike) -> list[dict]:
    """Records of a `.jsonl` file (one JSON object a line) or a `.json` file (a list of objects)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Data file not found: {str(path)!r}.")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}: line {number} is not valid JSON ({error}).") from error
        return records
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"{path}: a .json data file must hold a list of records, got {type(data).__name__}.")
    return data


def normalize_record(record: dict, image_root: str | os.PathLike | None = None) -> tuple[list[dict], list[Path]]:
    """(messages in the chat-template format with `{"type": "image"}` parts, image paths in order of appearance).

    Raises ValueError naming what is wrong with the record."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    root = Path(image_root) if image_root is not None else Path(".")
    if "messages" in record:
        messages, images = _from_messages(record["messages"])
    elif "conversations" in record:
        messages, images = _from_sharegpt(record)
    else:
        raise ValueError("the record has neither `messages` nor `conversations`")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the conversation has no assistant turn (nothing to learn)")
    paths = []
    for image in images:
        path = Path(image)
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise ValueError(f"image file not found: {str(path)!r}")
        paths.append(path)
    return messages, paths


def _from_messages(raw) -> tuple[list[dict], list[str]]:
    if not isinstance(raw, list) or not raw:
        raise ValueError("`messages` must be a non-empty list")
    messages, images = [], []
    for turn, message in enumerate(raw):
        role = ROLE_NAMES.get(str(message.get("role", "")).lower()) if isinstance(message, dict) else None
        if role is None:
            raise ValueError(f"message {turn} has no known role (user/assistant/system)")
        content = message.get("content")
        if isinstance(content, str):
            if IMAGE_MARKER in content or "<|image_pad|>" in content:
                raise ValueError(f"message {turn} has an image marker in plain text: give images as {{'type': 'image'}} parts")
            messages.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise ValueError(f"message {turn}: content must be a string or a list of parts")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image" or (isinstance(part, dict) and "image" in part):
                image = part.get("image") or part.get("path") or part.get("url")
                if not isinstance(image, str):
                    raise ValueError(f"message {turn} has an image part without a file path")
                images.append(image)
                parts.append({"type": "image"})
            elif kind == "text":
                text = part.get("text", "")
                if IMAGE_MARKER in text or "<|image_pad|>" in text:
                    raise ValueError(f"message {turn} has an image marker inside a text part")
                parts.append({"type": "text", "text": text})
            else:
                raise ValueError(f"message {turn} has a part of unsupported type {kind!r}")
        messages.append({"role": role, "content": parts})
    return messages, images


def _from_sharegpt(record: dict) -> tuple[list[dict], list[str]]:
    images = record.get("images", record.get("image", []))
    images = [images] if isinstance(images, str) else list(images or [])
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise ValueError("`conversations` must be a non-empty list")
    markers = sum(str(t.get("value", "")).count(IMAGE_MARKER) for t in turns if isinstance(t, dict))
    if markers != len(images):
        raise ValueError(f"{markers} {IMAGE_MARKER} markers but {len(images)} images")
    messages = []
    for turn, item in enumerate(turns):
        role = ROLE_NAMES.get(str(item.get("from", "")).lower()) if isinstance(item, dict) else None
        if role is None:
            raise ValueError(f"turn {turn} has no known `from` (human/gpt/system)")
        value = str(item.get("value", ""))
        if IMAGE_MARKER not in value:
            messages.append({"role": role, "content": value})
            continue
        parts = []
        for k, text in enumerate(value.split(IMAGE_MARKER)):
            if k > 0:
                parts.append({"type": "image"})
            text = text.strip("\n") if k > 0 or text.strip() == "" else text
            if text:
                parts.append({"type": "text", "text": text})
        messages.append({"role": role, "content": parts})
    return messages, images


def assistant_labels(input_ids: torch.Tensor, header_ids: list[int], end_id: int) -> torch.Tensor:
    """Labels [T] of one sequence: the tokens after each assistant header through the next turn end; -100 elsewhere."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    ids = input_ids.tolist()
    n, t = len(header_ids), 0
    while t <= len(ids) - n:
        if ids[t : t + n] == header_ids:
            start = t + n
            end = start
            while end < len(ids) and ids[end] != end_id:
                end += 1
            stop = min(end + 1, len(ids))
            labels[start:stop] = input_ids[start:stop]
            t = stop
        else:
            t += 1
    return labels


class ConversationDataset(torch.utils.data.Dataset):
    """Processed conversations: each item has `input_ids` [T], `labels` [T] and, with images, `pixel_values`
    [patches, dim] and `image_grid_thw` [images, 3].

    Records are processed when the dataset is built, so every bad sample is found (and reported) before
    training starts.

    Args:
        records: a data file path (`.json` / `.jsonl`) or a list of records.
        processor: an `InfiniteVLProcessor` (its chat template and tokenizer) or any processor with the same API.
        image_root: folder image paths are relative to (default: the data file's folder, else the working folder).
        max_length: longest sequence in tokens; longer records are bad samples (None: no limit).
        on_bad_sample: `"raise"` (stop at the first bad record) or `"skip"` (leave it out, log it, list it in `skipped`).
    """

    def __init__(self, records, processor, image_root=None, max_length: int | None = None, on_bad_sample: str = "raise"):
        if on_bad_sample not in ("raise", "skip"):
            raise ValueError(f"on_bad_sample must be 'raise' or 'skip', got {on_bad_sample!r}.")
        if isinstance(records, (str, os.PathLike)):
            image_root = image_root if image_root is not None else Path(records).parent
            records = read_records(records)
        self.processor = processor
        tokenizer = processor.tokenizer
        self.header_ids = tokenizer.encode(ASSISTANT_HEADER, add_special_tokens=False)
        self.end_id = tokenizer.convert_tokens_to_ids(TURN_END)
        self.image_token_id = tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", "<|image_pad|>"))
        self.merge_size = processor.image_processor.merge_size
        self.max_length = max_length
        self.skipped: list[tuple[int, str]] = []
        self.indices: list[int] = []
        self.items: list[dict] = []
        for index, record in enumerate(records):
            try:
                item = self._process(record, image_root)
            except (ValueError, OSError) as error:
                reason = error.reason if isinstance(error, BadSampleError) else str(error)
                if on_bad_sample == "raise":
                    raise BadSampleError(index, reason) from error
                logger.warning("Skipping bad sample %d: %s", index, reason)
                self.skipped.append((index, reason))
                continue
            self.items.append(item)
            self.indices.append(index)
        if self.skipped:
            logger.warning(
                "Skipped %d of %d samples: %s", len(self.skipped), len(records),
                "; ".join(f"{i}: {r}" for i, r in self.skipped),
            )
        if not self.items:
            raise ValueError(f"No usable sample among {len(records)} records (skipped: {self.skipped}).")

    def _process(self, record, image_root) -> dict:
        messages, paths = normalize_record(record, image_root)
        text = self.processor.apply_chat_template(messages, tokenize=False)
        inputs = self.processor(text=[text], images=[str(p) for p in paths] or None, return_tensors="pt")
        input_ids = inputs["input_ids"][0]
        found = int((input_ids == self.image_token_id).sum())
        expected = 0
        if paths:
            grid = inputs["image_grid_thw"]
            expected = int((grid.prod(-1) // self.merge_size**2).sum())
        if found != expected:
            raise ValueError(f"the text has {found} image tokens but its {len(paths)} images need {expected}")
        if self.max_length is not None and input_ids.numel() > self.max_length:
            raise ValueError(f"{input_ids.numel()} tokens, more than max_length={self.max_length}")
        labels = assistant_labels(input_ids, self.header_ids, self.end_id)
        if not bool((labels != IGNORE_INDEX).any()):
            raise ValueError("no assistant token is left to learn from")
        item = {"input_ids": input_ids, "labels": labels}
        if paths:
            item["pixel_values"] = inputs["pixel_values"]
            item["image_grid_thw"] = inputs["image_grid_thw"]
        return item

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


@dataclass
class ConversationCollator:
    """Batches `ConversationDataset` items.

    pack=False: right-padded rows with `attention_mask` (padding: `pad_token_id`, label -100).
    pack=True: the whole batch in ONE row with `cu_seqlens` [N + 1]; the model keeps the samples apart (own
    Gated DeltaNet state, convolution and attention window; positions restart). The first label of every
    sample is -100, so no token predicts across a boundary.
    """

    pad_token_id: int
    pack: bool = False

    def __call__(self, items: list[dict]) -> dict:
        batch = {}
        images = [it for it in items if "pixel_values" in it]
        if images:
            batch["pixel_values"] = torch.cat([it["pixel_values"] for it in images])
            batch["image_grid_thw"] = torch.cat([it["image_grid_thw"] for it in images])
        if self.pack:
            labels = [it["labels"].clone() for it in items]
            for label in labels:
                label[0] = IGNORE_INDEX
            lengths = torch.tensor([it["input_ids"].numel() for it in items])
            batch["input_ids"] = torch.cat([it["input_ids"] for it in items])[None]
            batch["labels"] = torch.cat(labels)[None]
            batch["cu_seqlens"] = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
            return batch
        length = max(it["input_ids"].numel() for it in items)
        input_ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, it in enumerate(items):
            n = it["input_ids"].numel()
            input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = it["input_ids"], it["labels"], 1
        batch.update(input_ids=input_ids, labels=labels, attention_mask=attention_mask)
        return batch


def split_packed(batch: dict, image_token_id: int, merge_size: int) -> list[dict]:
    """The samples of a packed batch (`cu_seqlens`), each as a batch of one row with its own images."""
    bounds = batch["cu_seqlens"].tolist()
    grids = batch.get("image_grid_thw")
    patches = grids.prod(-1) if grids is not None else None
    image, patch = 0, 0
    samples = []
    for bos, eos in zip(bounds[:-1], bounds[1:]):
        sample = {k: batch[k][:, bos:eos] for k in ("input_ids", "labels") if k in batch}
        need = int((sample["input_ids"] == image_token_id).sum())
        first = image
        while need > 0:
            need -= int(grids[image].prod()) // merge_size**2
            image += 1
        if image > first:
            count = int(patches[first:image].sum())
            sample["image_grid_thw"] = grids[first:image]
            sample["pixel_values"] = batch["pixel_values"][patch : patch + count]
            patch += count
        samples.append(sample)
    return samples
