"""Distillation and fine-tuning on a tiny Qwen2.5-VL teacher converted to InfiniteVL (CPU, synthetic data).

Stage 1 lowers the layer MSE, stage 2 the KL, and afterwards the student's greedy tokens follow the teacher's;
packed rows equal separate samples; frozen parameters do not move; checkpoints resume to the same loss; bad
samples are reported with their index."""

from __future__ import annotations

import json
import random
import shutil
import warnings

import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, TrainingArguments

from infinitevl_hf import InfiniteVLForConditionalGeneration
from infinitevl_hf.conversion import convert_teacher
from infinitevl_hf.tiny import SPECIAL_TOKENS, tiny_processor
from infinitevl_hf.training import (
    BadSampleError,
    ConversationCollator,
    ConversationDataset,
    LayerDistillationTrainer,
    LogitDistillationTrainer,
    SFTTrainer,
    distillation_kl,
    next_token_loss,
    normalize_record,
    select_trainable,
)

WORDS = "the a cat dog red blue big small runs sits on under tree house what is this picture shows".split()


def teacher_config(tokenizer) -> Qwen2_5_VLConfig:
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    text = dict(
        vocab_size=576, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
        pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], bos_token_id=None, initializer_range=0.08,
    )
    vision = dict(
        depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[0],
    )
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True,
    )


def sentence(rng, n) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def records(rng, count, image_names) -> list[dict]:
    out = []
    for i in range(count):
        user = [{"type": "text", "text": sentence(rng, rng.randint(4, 10))}]
        if i % 3 == 0:
            user.insert(0, {"type": "image", "image": rng.choice(image_names)})
        out.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": sentence(rng, rng.randint(3, 8))}]})
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is much faster than several (and immune to a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("distill")
    processor = tiny_processor()
    torch.manual_seed(0)
    teacher = Qwen2_5_VLForConditionalGeneration(teacher_config(processor.tokenizer)).eval()
    teacher.save_pretrained(root / "teacher")
    processor.save_pretrained(root / "teacher")
    student_dir = convert_teacher(root / "teacher", root / "student", window=16, dtype="float32", progress=False, hooks=False)
    rng = random.Random(0)
    names = []
    for k in range(3):
        name = f"img{k}.png"
        Image.fromarray((torch.rand(56, 84, 3) * 255).byte().numpy()).save(root / name)
        names.append(name)
    train = root / "train.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in records(rng, 24, names)))
    held = root / "held.json"
    held.write_text(json.dumps(records(rng, 8, names)))
    return dict(root=root, processor=processor, teacher=teacher, student_dir=student_dir, train=train, held=held)


def student(setup):
    return InfiniteVLForConditionalGeneration.from_pretrained(setup["student_dir"]).float()


def args(out, steps, lr, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(out), max_steps=steps, learning_rate=lr, per_device_train_batch_size=4, lr_scheduler_type="constant",
        logging_steps=steps, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
        dataloader_num_workers=0, weight_decay=0.0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def collator(setup, pack=False):
    return ConversationCollator(pad_token_id=setup["processor"].tokenizer.pad_token_id, pack=pack)


def eval_metrics(setup, model, dataset):
    """Summed layer MSE, KL at T=1, and teacher-forced argmax agreement on the assistant tokens of `dataset`."""
    trainer = LayerDistillationTrainer(model=model, teacher=setup["teacher"], trainable=None, args=args(setup["root"] / "eval", 1, 0.0))
    mse, kl, agree, total = 0.0, 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for item in dataset:
            batch = collator(setup)([item])
            mse += float(sum(trainer.layer_losses(model, batch).values()))
            t_logits = setup["teacher"](**{k: v for k, v in batch.items() if k != "labels"}).logits
            s_logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            kl += float(distillation_kl(s_logits, t_logits, batch["attention_mask"].bool(), 1.0))
            answer = batch["labels"][0, 1:] != -100
            agree += int((s_logits[0, :-1].argmax(-1) == t_logits[0, :-1].argmax(-1))[answer].sum())
            total += int(answer.sum())
    trainer.capture.remove()
    n = len(dataset)
    return mse / n, kl / n, agree / total


def greedy_agreement(setup, model, dataset, new_tokens=6) -> float:
    """Fraction of greedy-generated tokens equal to the teacher's, on the prompts of `dataset`."""
    processor = setup["processor"]
    same = total = 0
    for item in dataset:
        prompt_end = int((item["labels"] != -100).nonzero()[0])
        inputs = {"input_ids": item["input_ids"][None, :prompt_end]}
        if "pixel_values" in item:
            inputs.update(pixel_values=item["pixel_values"], image_grid_thw=item["image_grid_thw"])
        kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id, eos_token_id=None)
        t = setup["teacher"].generate(**inputs, **kw)[0, prompt_end:]
        s = model.generate(**inputs, **kw)[0, prompt_end:]
        same += int((t == s).sum())
        total += t.numel()
    return same / total


@pytest.fixture(scope="module")
def distilled(setup):
    """Held-out metrics of one student before, after stage 1 and after stage 2 (one run shared by the tests)."""
    processor = setup["processor"]
    train = ConversationDataset(setup["train"], processor)
    held = ConversationDataset(setup["held"], processor)
    model = student(setup)
    mse0, kl0, agree0 = eval_metrics(setup, model, held)
    greedy0 = greedy_agreement(setup, model, held)

    stage1 = LayerDistillationTrainer(
        model=model, teacher=setup["teacher"], args=args(setup["root"] / "s1", 150, 1e-2), train_dataset=train,
        data_collator=collator(setup),
    )
    stage1.train()
    stage1.capture.remove()
    mse1, kl1, agree1 = eval_metrics(setup, model, held)

    stage2 = LogitDistillationTrainer(
        model=model, teacher=setup["teacher"], temperature=2.0, args=args(setup["root"] / "s2", 200, 5e-3),
        train_dataset=train, data_collator=collator(setup, pack=True),
    )
    stage2.train()
    mse2, kl2, agree2 = eval_metrics(setup, model, held)
    greedy2 = greedy_agreement(setup, model, held)
    print(
        f"\nheld-out: layer MSE {mse0:.4g} -> {mse1:.4g} (stage 1) -> {mse2:.4g}; KL(T=1) {kl0:.4g} -> {kl1:.4g} -> {kl2:.4g}; "
        f"teacher-forced argmax agreement {agree0:.3f} -> {agree1:.3f} -> {agree2:.3f}; greedy agreement {greedy0:.3f} -> {greedy2:.3f} "
        f"(chance {1 / 576:.4f})"
    )
    return dict(mse=(mse0, mse1, mse2), kl=(kl0, kl1, kl2), agree=(agree0, agree1, agree2), greedy=(greedy0, greedy2))


def test_stage1_distils_the_teacher_layers(distilled):
    mse0, mse1, _ = distilled["mse"]
    assert mse1 < mse0 / 10


def test_each_stage_brings_the_logits_closer_to_the_teacher(distilled):
    kl0, kl1, kl2 = distilled["kl"]
    assert kl2 < kl1 < kl0


def test_the_two_stages_distil_the_teacher_tokens(distilled):
    agree0, _, agree2 = distilled["agree"]
    _, greedy2 = distilled["greedy"]
    assert agree2 > agree0 + 0.3 and greedy2 > 0.3  # chance is 1/576


def test_packed_row_equals_separate_samples(setup):
    processor = setup["processor"]
    dataset = ConversationDataset(setup["train"], processor)
    items = [dataset[0], dataset[1]]  # sample 0 has an image, sample 1 has none
    assert "pixel_values" in items[0] and "pixel_values" not in items[1]
    model = student(setup).train()
    model.config.text_config.sliding_window = 1 << 20
    for layer in model.model.language_model.layers:
        if hasattr(layer.self_attn, "window"):
            layer.self_attn.window = layer.self_attn.sliding_window = 8  # windows shorter than the samples

    separate_losses = []
    model.zero_grad()
    for item in items:
        batch = collator(setup)([item])
        labels = batch["labels"].clone()
        labels[:, 0] = -100
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        loss = next_token_loss(logits, labels, reduction="sum")
        loss.backward()
        separate_losses.append(loss.detach())
    separate_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    packed = collator(setup, pack=True)(items)
    assert packed["input_ids"].shape[0] == 1 and packed["cu_seqlens"].tolist()[0] == 0
    logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits
    bounds = packed["cu_seqlens"].tolist()
    packed_losses = [
        next_token_loss(logits[:, a:b], packed["labels"][:, a:b], reduction="sum") for a, b in zip(bounds[:-1], bounds[1:])
    ]
    sum(packed_losses).backward()
    for a, b in zip(separate_losses, packed_losses):
        torch.testing.assert_close(b.detach(), a, rtol=1e-5, atol=1e-5)
    for name, grad in separate_grads.items():
        packed_grad = dict(model.named_parameters())[name].grad
        assert (packed_grad - grad).norm() <= 1e-5 * grad.norm() + 1e-8, name  # fp32 summation order only


def test_packed_input_is_refused_with_a_cache_or_bad_bounds(setup):
    model = student(setup)
    ids = torch.randint(3, 400, (1, 10))
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        model(input_ids=ids, cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="one unpadded row"):
        model(input_ids=ids.expand(2, -1), cu_seqlens=torch.tensor([0, 4, 10]))


@pytest.fixture(scope="module")
def resumed_run(setup):
    """Six stage-1 steps saving every 3, then the same run resumed from step 3 (one pair shared by the tests)."""
    processor = setup["processor"]
    train = ConversationDataset(setup["train"], processor)
    model = student(setup)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = setup["root"] / "resume"
    kw = dict(logging_steps=1, save_strategy="steps", save_steps=3)
    full = LayerDistillationTrainer(model=model, teacher=setup["teacher"], args=args(out, 6, 1e-2, **kw), train_dataset=train, data_collator=collator(setup))
    full.train()
    full.capture.remove()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    losses = [log["loss"] for log in full.state.log_history if "loss" in log]

    resumed_model = student(setup)
    resumed = LayerDistillationTrainer(
        model=resumed_model, teacher=setup["teacher"], args=args(out, 6, 1e-2, **kw), train_dataset=train, data_collator=collator(setup)
    )
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    resumed.capture.remove()
    again = [log["loss"] for log in resumed.state.log_history if "loss" in log]
    shutil.rmtree(out)
    return dict(model=model, before=before, trainable=trainable, losses=losses, again=again)


def test_stage1_trains_the_gdn_mixers_only(resumed_run):
    trainable = resumed_run["trainable"]
    assert trainable and all(".self_attn." in n for n in trainable)
    assert all(f"layers.{i}." in " ".join(trainable) for i in (1, 2, 3)) and "layers.0." not in " ".join(trainable)


def test_trainable_parameters_change(resumed_run):
    model, before, trainable = resumed_run["model"], resumed_run["before"], resumed_run["trainable"]
    for name, param in model.named_parameters():
        if name in trainable:
            assert not torch.equal(param, before[name]), name


def test_frozen_parameters_stay(resumed_run):
    model, before, trainable = resumed_run["model"], resumed_run["before"], resumed_run["trainable"]
    for name, param in model.named_parameters():
        if name not in trainable:
            assert torch.equal(param, before[name]), f"frozen {name} changed"


def test_checkpoints_resume(resumed_run):
    assert resumed_run["again"][-3:] == pytest.approx(resumed_run["losses"][-3:], rel=1e-5)


def test_sft_masks_the_prompt(setup):
    processor = setup["processor"]
    train = ConversationDataset(setup["train"], processor)
    item = train[0]
    text = processor.tokenizer.decode(item["input_ids"][item["labels"] != -100])
    assert text.endswith("<|im_end|>") and "user" not in text and "<|image_pad|>" not in text


@pytest.fixture(scope="module")
def sft_run(setup):
    """Four packed SFT steps in bf16 with gradient checkpointing (one run shared by the tests): model and losses."""
    train = ConversationDataset(setup["train"], setup["processor"])
    model = student(setup)
    trainer = SFTTrainer(
        model=model, args=args(setup["root"] / "sft", 4, 1e-3, bf16=True, gradient_checkpointing=True, logging_steps=1),
        train_dataset=train, data_collator=collator(setup, pack=True),
    )
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return model, losses


def test_sft_trains_with_checkpointing_in_bf16(sft_run):
    _, losses = sft_run
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))


def test_sft_trains_the_mixers_only(sft_run):
    model, _ = sft_run
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in trainable
    assert not any("mlp" in n or "visual" in n or "embed" in n for n in trainable)


def test_lora_trains_only_adapters(setup):
    pytest.importorskip("peft")
    from infinitevl_hf.training import apply_lora

    model = apply_lora(student(setup), r=4, alpha=8)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert not any("visual" in n for n in names)
    assert any("self_attn.g_proj" in n for n in names) and any("mlp.down_proj" in n for n in names)
    train = ConversationDataset(setup["train"], setup["processor"])
    SFTTrainer(model=model, trainable=None, args=args(setup["root"] / "lora", 2, 1e-3), train_dataset=train, data_collator=collator(setup)).train()


def test_select_trainable_gdn_preset_picks_the_gdn_mixers(setup):
    model = student(setup)
    gdn = select_trainable(model, "gdn")
    assert gdn and all(".self_attn." in n and ".layers.0." not in n for n in gdn)


def test_select_trainable_none_preset_picks_nothing(setup):
    model = student(setup)
    assert select_trainable(model, "none") == []


def test_select_trainable_names_a_pattern_that_matches_nothing(setup):
    model = student(setup)
    with pytest.raises(ValueError, match="matches no parameter"):
        select_trainable(model, "no_such_module")


def _bad_samples(setup):
    """A JSONL file of one good sample, four bad ones and a good one."""
    root = setup["root"]
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the cat"}]}
    bad = [
        good,
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "missing.png"}, {"type": "text", "text": "x"}]},
                      {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"image": "img0.png", "conversations": [{"from": "human", "value": "<image> <image> two?"}, {"from": "gpt", "value": "one"}]},
        {"conversations": [{"from": "human", "value": "<|image_pad|> sneaky"}, {"from": "gpt", "value": "x"}]},
        {"image": "img1.png", "conversations": [{"from": "human", "value": "<image>\nwhat is this"}, {"from": "gpt", "value": "a dog"}]},
    ]
    path = root / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in bad))
    return path


def test_bad_samples_are_skipped(setup):
    dataset = ConversationDataset(_bad_samples(setup), setup["processor"], on_bad_sample="skip")
    assert dataset.indices == [0, 5]


def test_skipped_samples_are_reported_with_their_reason(setup):
    dataset = ConversationDataset(_bad_samples(setup), setup["processor"], on_bad_sample="skip")
    reasons = dict(dataset.skipped)
    assert sorted(reasons) == [1, 2, 3, 4]
    assert "missing.png" in reasons[1] and "no assistant turn" in reasons[2]
    assert "2 <image> markers but 1 images" in reasons[3] and "<|image_pad|>" in reasons[4]


def test_skipped_samples_are_logged(setup, caplog):
    path = _bad_samples(setup)
    with caplog.at_level("WARNING"):
        ConversationDataset(path, setup["processor"], on_bad_sample="skip")
    assert "Skipping bad sample 3" in caplog.text


def test_bad_samples_raise_with_their_index_on_request(setup):
    path = _bad_samples(setup)
    with pytest.raises(BadSampleError, match="Bad sample 1: image file not found") as error:
        ConversationDataset(path, setup["processor"], on_bad_sample="raise")
    assert error.value.index == 1


def test_an_unknown_on_bad_sample_is_refused(setup):
    path = _bad_samples(setup)
    with pytest.raises(ValueError, match="on_bad_sample"):
        ConversationDataset(path, setup["processor"], on_bad_sample="ignore")


def test_sharegpt_records_map_to_messages(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    messages, images = normalize_record(
        {"image": "a.png", "conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "<image>\nWhat?"},
                                             {"from": "gpt", "value": "A."}]},
        tmp_path,
    )
    assert messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A."},
    ]
    assert images == [tmp_path / "a.png"]


def test_cli_distill_stage1_runs(setup, capsys):
    import argparse

    from infinitevl_hf.training.cli import add_distill_arguments, run_distill

    out = setup["root"] / "cli-s1"
    args = add_distill_arguments(argparse.ArgumentParser()).parse_args(
        ["--teacher", str(setup["root"] / "teacher"), "--student", str(setup["student_dir"]), "--data", str(setup["train"]),
         "--stage", "1", "--out", str(out), "--max-steps", "2", "--grad-accum", "1", "--pack", "--batch-size", "2"]
    )
    assert run_distill(args) == 0
    assert f"Wrote the trained model to {out}" in capsys.readouterr().out  # says where
    assert InfiniteVLForConditionalGeneration.from_pretrained(out) is not None


@pytest.fixture(scope="module")
def cli_sft(setup):
    """One `infinitevl sft` step (shared by the tests): exit status, output folder and what it printed."""
    import argparse
    import contextlib
    import io

    from infinitevl_hf.training.cli import add_sft_arguments, run_sft

    out = setup["root"] / "cli-sft"
    args = add_sft_arguments(argparse.ArgumentParser()).parse_args(
        ["--model", str(setup["student_dir"]), "--data", str(setup["train"]), "--out", str(out), "--max-steps", "1",
         "--grad-accum", "1", "--batch-size", "2"]
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = run_sft(args)
    return status, out, printed.getvalue()


def test_cli_sft_runs(cli_sft):
    status, out, _ = cli_sft
    assert status == 0
    assert InfiniteVLForConditionalGeneration.from_pretrained(out) is not None


def test_cli_sft_says_where(cli_sft):
    _, out, printed = cli_sft
    assert f"Wrote the trained model to {out}" in printed


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_stage1_with_gradient_checkpointing_matches_without(setup, pack):
    """Checkpointed mixers are re-run in backward with the teacher inputs still fed: same losses, same update."""
    train = ConversationDataset(setup["train"], setup["processor"])
    runs = []
    for checkpointing in (False, True):
        model = student(setup)
        trainer = LayerDistillationTrainer(
            model=model, teacher=setup["teacher"], train_dataset=train, data_collator=collator(setup, pack=pack),
            args=args(setup["root"] / f"gc{int(checkpointing)}", 2, 1e-2, logging_steps=1, gradient_checkpointing=checkpointing,
                      gradient_checkpointing_kwargs={"use_reentrant": False}),
        )
        trainer.train()
        trainer.capture.remove()
        assert trainer._feed == {}  # nothing stays fed into the student after a step
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        runs.append((losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
    (plain_losses, plain_params), (gc_losses, gc_params) = runs
    assert gc_losses == pytest.approx(plain_losses, rel=1e-4)
    for name, value in plain_params.items():
        torch.testing.assert_close(gc_params[name], value, rtol=1e-4, atol=1e-6, msg=name)


def _trained_then_a_plain_teacher_forward(setup):
    train = ConversationDataset(setup["train"], setup["processor"])
    trainer = LayerDistillationTrainer(model=student(setup), teacher=setup["teacher"], train_dataset=train,
                                       data_collator=collator(setup), args=args(setup["root"] / "hooks", 1, 1e-3))
    trainer.train()
    with torch.no_grad():
        setup["teacher"](**{k: v for k, v in collator(setup)([train[0]]).items() if k != "labels"})
    return trainer


def test_teacher_hooks_record_nothing_outside_distillation(setup):
    trainer = _trained_then_a_plain_teacher_forward(setup)
    assert all(not parts for parts in trainer.capture.inputs.values())  # a plain teacher forward keeps nothing
    trainer.remove_hooks()


def test_teacher_hooks_detach(setup):
    from infinitevl_hf.training.trainers import teacher_layers

    trainer = _trained_then_a_plain_teacher_forward(setup)
    trainer.remove_hooks()
    layer = teacher_layers(setup["teacher"])[trainer.layers[0]].self_attn
    assert not layer._forward_hooks


def test_cli_training_arguments_reach_the_trainer():
    import argparse

    from infinitevl_hf.training.cli import _training_arguments, add_sft_arguments

    flags = ["--model", "m", "--data", "d.jsonl", "--out", "/tmp/unused-out", "--save-steps", "7", "--logging-steps", "3"]
    training_args = _training_arguments(add_sft_arguments(argparse.ArgumentParser()).parse_args(flags))
    assert training_args.save_steps == 7 and training_args.logging_steps == 3 and not training_args.bf16
    with_bf16 = add_sft_arguments(argparse.ArgumentParser()).parse_args(flags + ["--bf16"])
    if torch.cuda.is_available():
        assert _training_arguments(with_bf16).bf16
    else:  # transformers refuses bf16 without a GPU: proof that the flag reached TrainingArguments
        with pytest.raises(ValueError, match="bf16"):
            _training_arguments(with_bf16)
