"""Training throughput at full size (InfiniteVL-4B student, Qwen2.5-VL-3B teacher, random bf16 weights).

Stage-1 layer-wise distillation and SFT steps through `infinitevl_hf.training` (transformers.Trainer),
with and without packing and gradient checkpointing; tokens/s over the timed steps (after warm-up)
and peak GPU memory. Under `accelerate launch --num_processes N` the same script runs data-parallel
and reports aggregate tokens/s.

    python benchmarks/train_bench.py --out /tmp/train.json
    accelerate launch --num_processes 2 benchmarks/train_bench.py --out /tmp/train2.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from transformers import TrainerCallback, TrainingArguments

from bench import GiB, build_infinitevl, build_teacher, environment


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, the device synchronised at both ends."""

    def __init__(self):
        self.times, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)


def synthetic(samples: int, length: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(samples):
        ids = torch.randint(0, 150000, (length,), generator=generator)
        labels = ids.clone()
        labels[: length // 4] = -100  # a prompt part without loss
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def run(stage: str, pack: bool, checkpointing: bool, args, student, teacher) -> dict:
    from infinitevl_hf.training import ConversationCollator, LayerDistillationTrainer, SFTTrainer

    training_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps,
        learning_rate=1e-5, bf16=True, gradient_checkpointing=checkpointing, report_to="none", save_strategy="no",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_strategy="no", remove_unused_columns=False, dataloader_num_workers=0, seed=0,
    )
    common = dict(args=training_args, train_dataset=synthetic(args.batch * (args.warmup + args.steps) * 8, args.length, 0),
                  data_collator=ConversationCollator(pad_token_id=0, pack=pack))
    if stage == "stage1":
        trainer = LayerDistillationTrainer(model=student, teacher=teacher, **common)
    else:
        trainer = SFTTrainer(model=student, **common)
    timer = StepTimer()
    trainer.add_callback(timer)
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    timed = timer.times[args.warmup:]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tokens = args.batch * args.length * world
    if hasattr(trainer, "capture"):
        trainer.capture.remove()
    student.gradient_checkpointing_disable()
    return {"stage": stage, "packed": pack, "gradient_checkpointing": checkpointing, "world_size": world,
            "tokens_per_step": tokens, "step_s": sum(timed) / len(timed), "tokens_per_s": tokens * len(timed) / sum(timed),
            "peak_gib": torch.cuda.max_memory_allocated() / GiB}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="train_results.json")
    parser.add_argument("--batch", type=int, default=4, help="samples per GPU per step")
    parser.add_argument("--length", type=int, default=2048, help="tokens per sample")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--configs", nargs="+", default=["stage1:0:0", "stage1:1:1", "sft:0:0", "sft:1:1"],
                        help="stage:packed:gradient_checkpointing")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(rank)

    student, teacher = build_infinitevl(), build_teacher()
    rows = []
    for spec in args.configs:
        stage, pack, checkpointing = spec.split(":")
        try:
            row = run(stage, pack == "1", checkpointing == "1", args, student, teacher)
        except torch.cuda.OutOfMemoryError:
            row = {"config": spec, "error": "out of memory"}
        except Exception as error:  # noqa: BLE001 - keep the other configurations
            row = {"config": spec, "error": f"{type(error).__name__}: {str(error)[:300]}"}
        torch.cuda.empty_cache()
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"environment": environment(), "batch_per_gpu": args.batch, "length": args.length, "runs": rows}, f, indent=2)


if __name__ == "__main__":
    main()
