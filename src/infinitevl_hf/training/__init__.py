"""Distillation (stage 1: layer-wise MSE, stage 2: logit KL) and fine-tuning (stage 3: SFT, optionally LoRA) of
InfiniteVL on top of `transformers.Trainer`. Data: local JSON/JSONL conversations (see `data`)."""

from .data import BadSampleError, ConversationCollator, ConversationDataset, normalize_record, read_records, split_packed
from .trainers import (
    LORA_TARGET_MODULES,
    STAGE_DEFAULT_TRAINABLE,
    LayerDistillationTrainer,
    LogitDistillationTrainer,
    SFTTrainer,
    TeacherCapture,
    apply_lora,
    distillation_kl,
    gdn_layer_indices,
    next_token_loss,
    select_trainable,
)

__all__ = [
    "BadSampleError",
    "ConversationCollator",
    "ConversationDataset",
    "LORA_TARGET_MODULES",
    "LayerDistillationTrainer",
    "LogitDistillationTrainer",
    "SFTTrainer",
    "STAGE_DEFAULT_TRAINABLE",
    "TeacherCapture",
    "apply_lora",
    "distillation_kl",
    "gdn_layer_indices",
    "next_token_loss",
    "normalize_record",
    "read_records",
    "select_trainable",
    "split_packed",
]
