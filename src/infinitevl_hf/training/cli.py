"""`infinitevl distill` and `infinitevl sft`: argument parsers and runners (registered by `infinitevl_hf.cli`)."""

from __future__ import annotations

import argparse


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="JSON/JSONL conversations (messages or ShareGPT format)")
    parser.add_argument("--image-root", default=None, help="folder image paths are relative to (default: the data file's)")
    parser.add_argument("--out", required=True, help="output folder (checkpoints and the final model)")
    parser.add_argument("--trainable", default=None, help="gdn | mixers | language_model | all | comma-separated regexes")
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--on-bad-sample", choices=("raise", "skip"), default="raise")
    parser.add_argument("--pack", action="store_true", help="pack each batch into one row (cu_seqlens)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--warmup-ratio", type=float, default=0.01)
    parser.add_argument("--save-steps", type=int, default=500)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--resume", default=None, help="checkpoint folder to resume from")
    parser.add_argument("--seed", type=int, default=0)


def add_distill_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`infinitevl distill --teacher T --student S --data D --stage 1|2 --out O`."""
    parser.add_argument("--teacher", required=True, help="Qwen2.5-VL teacher folder or Hub id")
    parser.add_argument("--student", required=True, help="converted InfiniteVL folder (stage 1) or stage-1 output")
    parser.add_argument("--stage", type=int, choices=(1, 2), required=True)
    parser.add_argument("--temperature", type=float, default=2.0, help="stage 2 KL temperature")
    parser.add_argument("--mse-scale", type=float, default=1.0, help="stage 1 factor on the summed layer MSE")
    _common(parser)
    return parser


def add_sft_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`infinitevl sft --model M --data D --out O [--lora-r 16]`."""
    parser.add_argument("--model", required=True, help="InfiniteVL folder (e.g. the stage-2 output)")
    parser.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: no LoRA); needs peft")
    parser.add_argument("--lora-alpha", type=int, default=32)
    _common(parser)
    return parser


def _training_arguments(args):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr, num_train_epochs=args.epochs, max_steps=args.max_steps, lr_scheduler_type="cosine",
        warmup_steps=args.warmup_ratio,  # a float < 1 is a fraction of the steps
        save_steps=args.save_steps, logging_steps=args.logging_steps, bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing, seed=args.seed, report_to="none", weight_decay=0.0,
    )


def _data(args, processor):
    from .data import ConversationCollator, ConversationDataset

    dataset = ConversationDataset(args.data, processor, image_root=args.image_root, max_length=args.max_length,
                                  on_bad_sample=args.on_bad_sample)
    return dataset, ConversationCollator(pad_token_id=processor.tokenizer.pad_token_id, pack=args.pack)


def _dtype(args):
    import torch

    return torch.bfloat16 if args.bf16 else torch.float32


def run_distill(args) -> int:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from ..modeling import InfiniteVLForConditionalGeneration
    from ..processing import InfiniteVLProcessor
    from .trainers import STAGE_DEFAULT_TRAINABLE, LayerDistillationTrainer, LogitDistillationTrainer

    processor = InfiniteVLProcessor.from_pretrained(args.student)
    teacher = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.teacher, dtype=_dtype(args))
    student = InfiniteVLForConditionalGeneration.from_pretrained(args.student, dtype="float32")
    dataset, collator = _data(args, processor)
    stage = f"stage{args.stage}"
    common = dict(model=student, teacher=teacher, trainable=args.trainable or STAGE_DEFAULT_TRAINABLE[stage],
                  args=_training_arguments(args), train_dataset=dataset, data_collator=collator, processing_class=processor)
    if args.stage == 1:
        trainer = LayerDistillationTrainer(mse_scale=args.mse_scale, **common)
    else:
        trainer = LogitDistillationTrainer(temperature=args.temperature, **common)
    trainer.train(resume_from_checkpoint=args.resume)
    trainer.save_model(args.out)
    print(f"Wrote the trained model to {args.out} (checkpoints along the way: {args.out}/checkpoint-*)")
    return 0


def run_sft(args) -> int:
    from ..modeling import InfiniteVLForConditionalGeneration
    from ..processing import InfiniteVLProcessor
    from .trainers import STAGE_DEFAULT_TRAINABLE, SFTTrainer, apply_lora

    processor = InfiniteVLProcessor.from_pretrained(args.model)
    model = InfiniteVLForConditionalGeneration.from_pretrained(args.model, dtype="float32")
    trainable = args.trainable or STAGE_DEFAULT_TRAINABLE["sft"]
    if args.lora_r > 0:
        model, trainable = apply_lora(model, r=args.lora_r, alpha=args.lora_alpha), None
    dataset, collator = _data(args, processor)
    trainer = SFTTrainer(model=model, trainable=trainable, args=_training_arguments(args), train_dataset=dataset,
                         data_collator=collator, processing_class=processor)
    trainer.train(resume_from_checkpoint=args.resume)
    trainer.save_model(args.out)
    print(f"Wrote the trained model to {args.out} (checkpoints along the way: {args.out}/checkpoint-*)")
    return 0


__all__ = ["add_distill_arguments", "add_sft_arguments", "run_distill", "run_sft"]
