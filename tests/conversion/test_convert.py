"""Teacher (Qwen2.5-VL) -> InfiniteVL conversion: copies bit for bit, matches the teacher when every layer stays
attention, reads both key namings and sharded checkpoints, refuses bad inputs without leaving files behind."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import infinitevl_hf
from helpers import IMAGE_TOKEN, VIDEO_TOKEN, VISION_END, VISION_START, image_inputs, text_ids
from infinitevl_hf import InfiniteVLForConditionalGeneration
from infinitevl_hf.conversion import (
    ConversionError,
    add_convert_arguments,
    convert_teacher,
    parse_attention_layers,
    run_convert,
    to_canonical,
    to_legacy,
)
from infinitevl_hf.conversion import convert as convert_module
from infinitevl_hf.conversion.mapping import classify

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402

HEADS, KV_HEADS, HIDDEN = 4, 2, 32
HEAD_DIM = HIDDEN // HEADS
QUIET = dict(progress=False, dtype="float32")


def teacher_config(tie: bool = True) -> Qwen2_5_VLConfig:
    text = dict(
        vocab_size=128,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
        max_position_embeddings=4096,
        tie_word_embeddings=tie,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    vision = dict(
        depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=HIDDEN, patch_size=2,
        spatial_merge_size=2, temporal_patch_size=2, window_size=8, fullatt_block_indexes=[1], tokens_per_second=2,
    )
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END, tie_word_embeddings=tie,
    )


def make_teacher(folder, tie: bool = True, seed: int = 0, **save_kwargs):
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(teacher_config(tie)).eval()
    with torch.no_grad():  # visible attention biases, so dropping them in GDN layers is not a no-op
        for layer in model.model.language_model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.1)
    model.save_pretrained(folder, **save_kwargs)
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 4096}')
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    return model


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """Legacy-named single-file teacher (what transformers writes) with tied embeddings."""
    folder = tmp_path_factory.mktemp("teacher") / "qwen"
    model = make_teacher(folder)
    return folder, model


@pytest.fixture(scope="module")
def new_named_teacher(tmp_path_factory, teacher):
    """The same weights under transformers-5 names (`model.visual.*`, `model.language_model.*`)."""
    src, _ = teacher
    folder = tmp_path_factory.mktemp("teacher_new") / "qwen"
    shutil.copytree(src, folder)
    tensors = load_file(src / "model.safetensors")
    renamed = {to_canonical(k): v for k, v in tensors.items()}
    assert all(k.startswith(("model.visual.", "model.language_model.", "lm_head.")) for k in renamed)
    save_file(renamed, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def sharded_untied_teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher_sharded") / "qwen"
    model = make_teacher(folder, tie=False, seed=1, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder, model


@pytest.fixture(scope="module")
def converted_default(tmp_path_factory, teacher):
    out = tmp_path_factory.mktemp("out") / "default"
    return convert_teacher(teacher[0], out, **QUIET)


@pytest.fixture(scope="module")
def converted_all(tmp_path_factory, teacher):
    out = tmp_path_factory.mktemp("out") / "all"
    return convert_teacher(teacher[0], out, attention_layers="all", window=4096, **QUIET)


def teacher_tensors(folder) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else {"model.safetensors"}
    tensors = {}
    for name in files:
        tensors.update(load_file(folder / name))
    return tensors


def output_tensors(folder) -> dict[str, torch.Tensor]:
    return teacher_tensors(folder)


def load_pair(out, teacher_model, implementation="eager"):
    student = InfiniteVLForConditionalGeneration.from_pretrained(out, attn_implementation=implementation).eval()
    teacher_model.set_attn_implementation(implementation)
    return student


# ------------------------------------------------------------------------------------------- copies


@pytest.mark.parametrize("which", ["legacy", "new", "sharded_untied"])
def test_copied_tensors_are_bit_identical(which, teacher, new_named_teacher, sharded_untied_teacher, tmp_path):
    folder = {"legacy": teacher[0], "new": new_named_teacher, "sharded_untied": sharded_untied_teacher[0]}[which]
    out = convert_teacher(folder, tmp_path / "out", max_shard_size="30KB", **QUIET)
    assert (out / "model.safetensors.index.json").is_file()  # small shards: several files
    written = output_tensors(out)
    source = teacher_tensors(folder)
    copied = 0
    for key, tensor in source.items():
        name = to_canonical(key)
        rule, groups = classify(name)
        layer = groups.get("layer")
        if rule == "attention" and int(layer) % 4 != 0:  # became a Gated DeltaNet layer
            if groups["kind"] == "bias":
                assert name not in written  # GDN projections have no bias
            continue
        assert torch.equal(written[name].view(-1).view(torch.uint8), tensor.view(-1).view(torch.uint8)), name
        copied += 1
    assert copied == len([n for n in written if "self_attn" not in n or ".layers.0." in n])
    assert ("lm_head.weight" in written) == (which == "sharded_untied")
    gdn = {n for n in written if ".layers.1.self_attn." in n}
    assert {n.rsplit("self_attn.", 1)[1] for n in gdn} == {
        "q_proj.weight", "k_proj.weight", "v_proj.weight", "a_proj.weight", "b_proj.weight", "A_log", "dt_bias",
        "q_conv1d.weight", "k_conv1d.weight", "v_conv1d.weight", "g_proj.weight", "o_norm.weight", "o_proj.weight",
    }
    assert written["model.language_model.layers.1.self_attn.q_conv1d.weight"].shape == (HIDDEN, 1, 4)
    assert written["model.language_model.layers.1.self_attn.v_proj.weight"].shape == (HEADS * 2 * HEAD_DIM, HIDDEN)
    for name in ("tokenizer_config.json", "chat_template.jinja", "generation_config.json", "config.json"):
        assert (out / name).is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "infinite_vl"
    text = config["text_config"]
    assert text["layer_types"] == ["sliding_attention", "linear_attention", "linear_attention", "linear_attention"]
    assert (text["num_linear_heads"], text["linear_head_dim"], text["expand_v"]) == (HEADS, HEAD_DIM, 2)
    assert text["sliding_window"] == 8192


def test_bfloat16_output_keeps_A_log_float32(teacher, tmp_path):
    out = convert_teacher(teacher[0], tmp_path / "bf16", progress=False)  # default dtype bfloat16
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.language_model.layers.1.self_attn.A_log").dtype == torch.float32
        assert f.get_tensor("model.language_model.layers.1.self_attn.q_proj.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.visual.merger.mlp.0.weight").dtype == torch.bfloat16


def test_both_namings_convert_to_identical_checkpoints(teacher, new_named_teacher, tmp_path):
    a = output_tensors(convert_teacher(teacher[0], tmp_path / "a", **QUIET))
    b = output_tensors(convert_teacher(new_named_teacher, tmp_path / "b", **QUIET))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    model_a = InfiniteVLForConditionalGeneration.from_pretrained(tmp_path / "a").eval()
    model_b = InfiniteVLForConditionalGeneration.from_pretrained(tmp_path / "b").eval()
    ids = text_ids(1, 12)
    with torch.no_grad():
        assert torch.equal(model_a(input_ids=ids).logits, model_b(input_ids=ids).logits)


def test_mapping_round_trip(teacher):
    for key in teacher_tensors(teacher[0]):
        assert to_legacy(to_canonical(key)) == key
        assert to_canonical(to_canonical(key)) == to_canonical(key)


# ------------------------------------------------------------------------------------------- teacher equivalence


def _mm_token_types(ids):
    return (ids == IMAGE_TOKEN).long()


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_all_attention_conversion_matches_teacher_text(converted_all, teacher, implementation):
    student = load_pair(converted_all, teacher[1], implementation)
    ids = text_ids(2, 20)
    with torch.no_grad():
        expected = teacher[1](input_ids=ids, mm_token_type_ids=_mm_token_types(ids)).logits
        got = student(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _all_attention_pair_with_an_image(converted_all, teacher):
    student = load_pair(converted_all, teacher[1], "eager")
    ids, pixel_values, grid = image_inputs(grid=(1, 4, 8), prefix=4, suffix=7)
    return student, ids, dict(pixel_values=pixel_values, image_grid_thw=grid)


def test_all_attention_conversion_matches_teacher_image(converted_all, teacher):
    student, ids, vision = _all_attention_pair_with_an_image(converted_all, teacher)
    with torch.no_grad():
        expected = teacher[1](input_ids=ids, mm_token_type_ids=_mm_token_types(ids), **vision).logits
        got = student(input_ids=ids, **vision).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_all_attention_conversion_generates_the_teacher_tokens(converted_all, teacher):
    student, ids, vision = _all_attention_pair_with_an_image(converted_all, teacher)
    with torch.no_grad():
        greedy = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
        teacher_tokens = teacher[1].generate(input_ids=ids, mm_token_type_ids=_mm_token_types(ids), **vision, **greedy)
        student_tokens = student.generate(input_ids=ids, **vision, **greedy)
    assert torch.equal(student_tokens, teacher_tokens)


def test_all_attention_untied_sharded_matches_teacher(sharded_untied_teacher, tmp_path):
    folder, model = sharded_untied_teacher
    out = convert_teacher(folder, tmp_path / "out", attention_layers="all", window=64, **QUIET)
    student = load_pair(out, model, "eager")
    assert not student.config.text_config.tie_word_embeddings
    ids = text_ids(1, 40)  # window 64 > 40 tokens
    with torch.no_grad():
        expected = model(input_ids=ids, mm_token_type_ids=_mm_token_types(ids)).logits
        torch.testing.assert_close(student(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_default_conversion_loads_with_auto_class(converted_default):
    assert infinitevl_hf.InfiniteVLConfig  # the import registered the Auto classes
    model = AutoModelForImageTextToText.from_pretrained(converted_default).eval()
    assert isinstance(model, InfiniteVLForConditionalGeneration)


def test_default_conversion_keeps_attention_in_layer_0_only(converted_default):
    model = AutoModelForImageTextToText.from_pretrained(converted_default).eval()
    assert model.config.text_config.layer_types[:2] == ["sliding_attention", "linear_attention"]


def test_default_conversion_generates(converted_default):
    model = AutoModelForImageTextToText.from_pretrained(converted_default).eval()
    ids, pixel_values, grid = image_inputs()
    with torch.no_grad():
        tokens = model.generate(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid, max_new_tokens=5,
                                do_sample=False, eos_token_id=None, pad_token_id=0)
    assert tokens.shape == (1, ids.shape[1] + 5)


# ------------------------------------------------------------------------------------------- attention-transfer math


def test_attention_transfer_gdn_heads_read_what_teacher_heads_read(converted_default, teacher):
    student = InfiniteVLForConditionalGeneration.from_pretrained(converted_default).eval()
    gdn = student.model.language_model.layers[1].self_attn
    attn = teacher[1].model.language_model.layers[1].self_attn
    group = HEADS // KV_HEADS
    x = torch.randn(1, 5, HIDDEN, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        q_t = F.linear(x, attn.q_proj.weight).view(1, 5, HEADS, HEAD_DIM)
        k_t = F.linear(x, attn.k_proj.weight).view(1, 5, KV_HEADS, HEAD_DIM).repeat_interleave(group, dim=2)
        v_t = F.linear(x, attn.v_proj.weight).view(1, 5, KV_HEADS, HEAD_DIM).repeat_interleave(group, dim=2)
        torch.testing.assert_close(gdn.q_proj(x).view(1, 5, HEADS, HEAD_DIM), q_t, rtol=0, atol=1e-6)
        torch.testing.assert_close(gdn.k_proj(x).view(1, 5, HEADS, HEAD_DIM), k_t, rtol=0, atol=1e-6)
        v = gdn.v_proj(x).view(1, 5, HEADS, 2 * HEAD_DIM)
        torch.testing.assert_close(v[..., :HEAD_DIM], v_t, rtol=0, atol=1e-6)
        assert torch.count_nonzero(v[..., HEAD_DIM:]) == 0
        # o_proj reads head h's first half exactly like the teacher's o_proj reads head h
        y = torch.randn(1, 5, HEADS, HEAD_DIM)
        padded = torch.cat([y, torch.randn_like(y) * 0], dim=-1).reshape(1, 5, -1)
        torch.testing.assert_close(gdn.o_proj(padded), attn.o_proj(y.reshape(1, 5, -1)), rtol=0, atol=1e-6)
        # identity convs (then SiLU), g = -dt ~ 0, beta = 1/2
        conv_out, _ = gdn.q_conv1d(gdn.q_proj(x))
        torch.testing.assert_close(conv_out, F.silu(gdn.q_proj(x)), rtol=0, atol=1e-6)
        g = -gdn.A_log.exp() * F.softplus(gdn.a_proj(x) + gdn.dt_bias)
        torch.testing.assert_close(g, torch.full_like(g, -1e-3), rtol=1e-4, atol=0)
        assert torch.equal(gdn.b_proj(x).sigmoid(), torch.full((1, 5, HEADS), 0.5))
        assert torch.count_nonzero(gdn.g_proj.weight) > 0  # the output gate is open, not silu(0) = 0

        # One token from an empty state: S = beta k v^T, o = S^T q / sqrt(d) per head; the layer output must be
        # o_proj(RMSNorm(o) * silu(g_proj x)) built from the teacher head h (q), its kv group (k, v).
        x1 = x[:, :1]
        q = F.normalize(F.silu(F.linear(x1, attn.q_proj.weight)).view(1, 1, HEADS, HEAD_DIM), dim=-1)
        k = F.normalize(
            F.silu(F.linear(x1, attn.k_proj.weight)).view(1, 1, KV_HEADS, HEAD_DIM).repeat_interleave(group, 2), dim=-1
        )
        vv = F.silu(F.linear(x1, attn.v_proj.weight)).view(1, 1, KV_HEADS, HEAD_DIM).repeat_interleave(group, 2)
        o = 0.5 * (q * k).sum(-1, keepdim=True) / math.sqrt(HEAD_DIM) * torch.cat([vv, torch.zeros_like(vv)], -1)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + gdn.o_norm.eps)
        o = o * F.silu(gdn.g_proj(x1).view(1, 1, HEADS, 2 * HEAD_DIM))
        expected = F.linear(o.reshape(1, 1, -1), gdn.o_proj.weight)
        torch.testing.assert_close(gdn(x1), expected, rtol=1e-4, atol=1e-5)


def test_attention_transfer_needs_one_gdn_head_per_attention_head(teacher, tmp_path):
    overrides = {"num_linear_heads": 2, "num_linear_key_value_heads": 2, "linear_head_dim": 16}
    with pytest.raises(ConversionError, match="num_linear_heads.*must equal the teacher's `num_attention_heads`"):
        convert_teacher(teacher[0], tmp_path / "out", text_overrides=overrides, **QUIET)
    assert os.listdir(tmp_path) == []
    out = convert_teacher(teacher[0], tmp_path / "out", text_overrides=overrides, init="mimic", **QUIET)
    assert InfiniteVLForConditionalGeneration.from_pretrained(out).config.text_config.num_linear_heads == 2


@pytest.mark.parametrize("init", ["mimic", "random"])
def test_other_inits(init, teacher, tmp_path):
    out = convert_teacher(teacher[0], tmp_path / init, init=init, attention_layers="0,2", **QUIET)
    tensors = output_tensors(out)
    prefix = "model.language_model.layers.1.self_attn."
    assert f"model.language_model.layers.2.self_attn.q_proj.bias" in tensors  # layer 2 kept as attention
    q_teacher = teacher_tensors(teacher[0])["model.layers.1.self_attn.q_proj.weight"]
    assert not torch.equal(tensors[prefix + "q_proj.weight"], q_teacher)
    conv = tensors[prefix + "k_conv1d.weight"]
    if init == "mimic":
        assert torch.equal(tensors[prefix + "A_log"], torch.zeros(HEADS))
        assert torch.count_nonzero(tensors[prefix + "a_proj.weight"]) == 0
        assert torch.count_nonzero(tensors[prefix + "b_proj.weight"]) == 0
        assert torch.equal(conv[..., -1], torch.ones(HIDDEN, 1)) and torch.count_nonzero(conv[..., :-1]) == 0
    else:
        assert tensors[prefix + "A_log"].std() > 0 and torch.count_nonzero(conv[..., :-1]) > 0
        assert abs(tensors[prefix + "q_proj.weight"].std().item() - 0.02) < 0.01  # initializer_range
    model = InfiniteVLForConditionalGeneration.from_pretrained(out).eval()
    assert model.config.text_config.layer_types == ["sliding_attention", "linear_attention", "sliding_attention",
                                                    "linear_attention"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=text_ids(1, 10)).logits).all()


def test_parse_attention_layers():
    assert parse_attention_layers("every:4", 9) == [0, 4, 8]
    assert parse_attention_layers("all", 3) == [0, 1, 2]
    assert parse_attention_layers("4, 0", 9) == [0, 4]
    with pytest.raises(ConversionError, match="names layers \\[9\\]"):
        parse_attention_layers("0,9", 9)
    with pytest.raises(ConversionError, match="must be 'every:N', 'all' or a comma-separated list"):
        parse_attention_layers("every4", 9)


# ------------------------------------------------------------------------------------------- bad inputs, atomicity


def _bad(tmp_path, folder, match, **kwargs):
    parent = tmp_path / "parent"
    parent.mkdir(exist_ok=True)
    before = sorted(os.listdir(parent))
    with pytest.raises(ConversionError, match=match):
        convert_teacher(folder, parent / "out", **QUIET, **kwargs)
    assert sorted(os.listdir(parent)) == before


def test_rejects_a_folder_that_is_not_qwen2_5_vl(teacher, tmp_path):
    folder = tmp_path / "llama"
    shutil.copytree(teacher[0], folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config))
    _bad(tmp_path, folder, "model_type 'llama'.*qwen2_5_vl")
    _bad(tmp_path, tmp_path / "nowhere", "Teacher folder not found")  # a path, not a Hub id
    _bad(tmp_path, "no such id", "neither an existing folder nor a Hugging Face Hub id")
    empty = tmp_path / "empty"
    empty.mkdir()
    _bad(tmp_path, empty, "no config.json")


def test_rejects_a_missing_shard(sharded_untied_teacher, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(sharded_untied_teacher[0], folder)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    _bad(tmp_path, folder, f"missing 1 of the .* shards its index lists: \\['{shard.name}'\\]")


def test_rejects_pickled_weights_only(teacher, tmp_path):
    folder = tmp_path / "bin"
    shutil.copytree(teacher[0], folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    _bad(tmp_path, folder, "only pickled weights \\(\\*.bin\\)")


def _earlier_conversion(teacher, tmp_path):
    parent = tmp_path / "parent"
    parent.mkdir()
    convert_teacher(teacher[0], parent / "out", window=64, **QUIET)  # an earlier conversion: ours to replace
    before = json.loads((parent / "out" / "config.json").read_text())["text_config"]["sliding_window"]
    return parent, before


def _failed_forced_conversion(teacher, parent, monkeypatch):
    def broken_verify(*args, **kwargs):
        raise ConversionError("Verification failed: simulated")

    with monkeypatch.context() as m:
        m.setattr(convert_module, "_verify", broken_verify)
        with pytest.raises(ConversionError, match="simulated"):
            convert_teacher(teacher[0], parent / "out", force=True, **QUIET)


def test_existing_out_needs_force(teacher, tmp_path):
    _earlier_conversion(teacher, tmp_path)
    _bad(tmp_path, teacher[0], "already exists; pass force=True")


def test_a_failed_forced_conversion_leaves_the_earlier_output(teacher, tmp_path, monkeypatch):
    parent, before = _earlier_conversion(teacher, tmp_path)
    _failed_forced_conversion(teacher, parent, monkeypatch)
    assert sorted(os.listdir(parent)) == ["out"] and before == 64
    assert json.loads((parent / "out" / "config.json").read_text())["text_config"]["sliding_window"] == 64


def test_force_replaces_the_earlier_output_after_success(teacher, tmp_path, monkeypatch):
    parent, _ = _earlier_conversion(teacher, tmp_path)
    _failed_forced_conversion(teacher, parent, monkeypatch)
    convert_teacher(teacher[0], parent / "out", force=True, **QUIET)
    assert sorted(os.listdir(parent)) == ["out"]
    assert json.loads((parent / "out" / "config.json").read_text())["text_config"]["sliding_window"] == 8192


def test_force_never_replaces_a_folder_this_package_did_not_write(teacher, tmp_path):
    precious = tmp_path / "parent" / "out"
    precious.mkdir(parents=True)
    (precious / "keep.txt").write_text("mine")
    _bad(tmp_path, teacher[0], "not a folder infinitevl-hf wrote", force=True)
    assert (precious / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("where", ["teacher", "parent", "inside"])
def test_output_that_is_holds_or_lies_in_the_teacher_is_refused(teacher, tmp_path, where):
    home = tmp_path / "home"
    shutil.copytree(teacher[0], home / "qwen")
    (home / "sibling.txt").write_text("keep")
    out = {"teacher": home / "qwen", "parent": home, "inside": home / "qwen" / "out"}[where]
    match = {"teacher": "is the source folder", "parent": "contains the source", "inside": "lies inside the source"}[where]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ConversionError, match=match):
        convert_teacher(home / "qwen", out, force=True, **QUIET)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (home / "sibling.txt").read_text() == "keep"


DEAD = 2**22 + 12345  # above the default pid_max: no process has it


def _convert_over_a_killed_conversion(teacher, tmp_path):
    parent = tmp_path / "parent"
    (parent / f".out.converting-{DEAD}-0123abcd").mkdir(parents=True)
    (parent / f".out.converting-{DEAD}-0123abcd" / "model.safetensors").write_bytes(b"half")
    convert_teacher(teacher[0], parent / "out", **QUIET)
    return parent


def test_leftovers_of_a_killed_conversion_are_cleaned(teacher, tmp_path):
    parent = _convert_over_a_killed_conversion(teacher, tmp_path)
    assert sorted(os.listdir(parent)) == ["out"]


def test_converted_folders_are_0755(teacher, tmp_path):
    parent = _convert_over_a_killed_conversion(teacher, tmp_path)
    assert (parent / "out").stat().st_mode & 0o777 == 0o755


def test_a_conversion_killed_mid_swap_gets_the_old_folder_back(teacher, tmp_path):
    dead = DEAD
    parent = _convert_over_a_killed_conversion(teacher, tmp_path)
    # Killed between "old aside" and "new in": the old folder is put back.
    (parent / "out").rename(parent / f".out.replaced-{dead}-0123abcd")
    from infinitevl_hf.staged import clean_leftovers

    assert clean_leftovers(parent / "out") and sorted(os.listdir(parent)) == ["out"]
    assert (parent / "out" / "config.json").is_file()


def test_corrupt_or_outside_pointing_teacher_shards_are_one_line_errors(teacher, tmp_path, capsys):
    from infinitevl_hf import cli

    corrupt = tmp_path / "corrupt"
    shutil.copytree(teacher[0], corrupt)
    (corrupt / "model.safetensors").write_bytes((corrupt / "model.safetensors").read_bytes()[:3000])
    outside = tmp_path / "outside"
    shutil.copytree(teacher[0], outside)
    with safe_open(outside / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    (outside / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (outside / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "../elsewhere.safetensors" for k in keys}}))
    for folder, match in ((corrupt, "not a readable safetensors file"), (outside, "not a file in the checkpoint folder")):
        assert cli.main(["convert", "--teacher", str(folder), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err
        assert not (tmp_path / "out").exists()


def test_missing_local_teacher_is_folder_not_found(tmp_path):
    with pytest.raises(ConversionError, match="Teacher folder not found"):
        convert_teacher(str(tmp_path / "no" / "such"), tmp_path / "out", **QUIET)
    with pytest.raises(ConversionError, match="Teacher folder not found"):
        convert_teacher("./missing-teacher", tmp_path / "out", **QUIET)


def test_bad_options(teacher, tmp_path):
    _bad(tmp_path, teacher[0], "init must be one of", init="distill")
    _bad(tmp_path, teacher[0], "window must be a positive", window=0)
    with pytest.raises(ConversionError, match="dtype must be one of"):
        convert_teacher(teacher[0], tmp_path / "x", dtype="int8", progress=False)


# ------------------------------------------------------------------------------------------- hub id, hooks, CLI


def test_hub_id_is_resolved_with_snapshot_download(teacher, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(repo_id)
        return str(teacher[0])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    out = convert_teacher("Qwen/Qwen2.5-VL-tiny", tmp_path / "out", **QUIET)
    assert calls == ["Qwen/Qwen2.5-VL-tiny"] and (out / "config.json").is_file()


def _convert_with_hooks(teacher, tmp_path, monkeypatch):
    """A conversion with stand-ins for the export and card hooks; what each stand-in was called with."""
    seen = {}
    export = types.ModuleType("infinitevl_hf.export")
    export.write_remote_code = lambda folder: seen.setdefault("code", folder)
    cards = types.ModuleType("infinitevl_hf.cards")
    cards.write_model_card = lambda folder, kind, **info: seen.setdefault("card", (folder, kind, info))
    monkeypatch.setitem(sys.modules, "infinitevl_hf.export", export)
    monkeypatch.setitem(sys.modules, "infinitevl_hf.cards", cards)
    monkeypatch.setattr(infinitevl_hf, "export", export, raising=False)
    monkeypatch.setattr(infinitevl_hf, "cards", cards, raising=False)
    out = convert_teacher(teacher[0], tmp_path / "out", **QUIET)
    return out, seen


def test_export_hook_is_called_before_the_rename(teacher, tmp_path, monkeypatch):
    out, seen = _convert_with_hooks(teacher, tmp_path, monkeypatch)
    assert seen["code"].parent == out.parent  # called on the temporary folder, before the rename


def test_card_hook_is_called_with_the_conversion_info(teacher, tmp_path, monkeypatch):
    _, seen = _convert_with_hooks(teacher, tmp_path, monkeypatch)
    folder, kind, info = seen["card"]
    assert kind == "converted" and info["init"] == "attention-transfer" and info["attention_layers"] == [0]


def test_cli_pair(teacher, tmp_path, capsys):
    parser = add_convert_arguments(argparse.ArgumentParser(prog="infinitevl convert"))
    args = parser.parse_args(["--teacher", str(teacher[0]), "--out", str(tmp_path / "cli"), "--attention-layers",
                              "0,1", "--window", "128", "--dtype", "float32", "--no-progress"])
    assert run_convert(args) == 0
    config = json.loads((tmp_path / "cli" / "config.json").read_text())["text_config"]
    assert config["layer_types"][:3] == ["sliding_attention", "sliding_attention", "linear_attention"]
    assert config["sliding_window"] == 128
    assert run_convert(args) == 2  # exists, no --force
    assert "already exists" in capsys.readouterr().err
