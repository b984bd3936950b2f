"""generate() on CUDA decodes through the model's captured graph by default: same tokens as the module path,
replays counted, nothing captured or compiled again by a second call, batched rows equal to the rows alone,
fallbacks taken and logged. A mid-size random model in float32, so that greedy tokens are exact."""

import logging

import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytestmark = [pytest.mark.gpu, needs_cuda]

NEW = 64


def _build(sliding_window: int = 512):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from helpers import tiny_config

    from infinitevl_hf import InfiniteVLForConditionalGeneration

    config = tiny_config(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
                         num_key_value_heads=2, num_linear_heads=4, num_linear_key_value_heads=4, linear_head_dim=32,
                         sliding_window=sliding_window, vocab_size=512,
                         rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 10000.0})
    config.vision_config.out_hidden_size = config.text_config.hidden_size
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = InfiniteVLForConditionalGeneration(config)
    return model.float().eval()


@pytest.fixture(scope="module")
def model():
    return _build()


def _image(model, seed=0):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from helpers import image_inputs

    ids, pixels, grid = image_inputs(seed=seed, prefix=40, suffix=30)
    return dict(input_ids=ids.cuda(), pixel_values=pixels.cuda(), image_grid_thw=grid.cuda())


def _text(rows=1, length=150, seed=1):
    return dict(input_ids=torch.randint(3, 80, (rows, length), device="cuda", generator=torch.Generator("cuda").manual_seed(seed)))


def _greedy(model, inputs, **flags):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, **flags)


@pytest.mark.parametrize("kind", ["text", "image", "text-over-a-window"])
def test_default_generate_gives_the_module_path_tokens(model, kind):
    from infinitevl_hf.speed import decode_graphs_of

    inputs = {"text": _text, "image": lambda: _image(model), "text-over-a-window": lambda: _text(length=700)}[kind]()
    graphs = decode_graphs_of(model)
    replays, prompts = graphs.replays, graphs.prompt_replays
    fast = _greedy(model, inputs)
    assert graphs.replays - replays == NEW - 1  # every token after the first came from the graph
    assert graphs.prompt_replays - prompts == (0 if kind == "text-over-a-window" else 1)  # prompts up to a window
    reference = _greedy(model, inputs, disable_compile=True)
    assert torch.equal(fast, reference)


def test_a_long_padded_prompt_attends_to_its_own_keys_with_the_module_path_tokens(monkeypatch):
    """A captured prompt of over 1,024 tokens, left-padded into its bucket, runs flex_attention over its own keys
    only (the rings start empty), and gives the module path's tokens."""
    from infinitevl_hf.modeling import attention_paths
    from infinitevl_hf.speed import decode_graphs_of
    from infinitevl_hf.speed.prompt_graphs import prompt_bucket

    bucket = prompt_bucket(1100, 2048)
    assert bucket > 1100  # padded
    pasts = []
    flex = attention_paths.window_flex_attention

    def recorded(query, key, value, past_length, *args, **kwargs):
        pasts.append((past_length, key.shape[2]))
        return flex(query, key, value, past_length, *args, **kwargs)

    monkeypatch.setattr(attention_paths, "window_flex_attention", recorded)
    model = _build(sliding_window=2048)
    inputs = _text(length=1100)
    fast = _greedy(model, inputs)
    assert decode_graphs_of(model).prompt_replays == 1
    assert pasts and set(pasts) == {(0, bucket)}  # each attention layer over the bucket's own keys
    assert torch.equal(fast, _greedy(model, inputs, disable_compile=True))


def test_the_host_runs_a_step_ahead_and_stops_where_transformers_loop_stops(model, monkeypatch):
    """The default call runs the loop that reads the stop one step late (`speed.sampling_loop`); with rows ending
    on an end token at different steps it returns transformers' loop's ids over the module path, and its graph
    replays one step more than it keeps."""
    import infinitevl_hf.modeling.modeling_infinitevl as modeling
    from infinitevl_hf.speed import decode_graphs_of

    inputs = _text(rows=2, seed=31)
    free = _greedy(model, inputs)[:, 150:]
    flags = dict(max_new_tokens=NEW, do_sample=False, eos_token_id=sorted({int(free[0, 9]), int(free[1, 20])}),
                 pad_token_id=0)
    ran = []
    late = modeling.sample_ahead
    monkeypatch.setattr(modeling, "sample_ahead", lambda *args, **kw: ran.append(1) or late(*args, **kw))
    graphs = decode_graphs_of(model)
    replays = graphs.replays
    with torch.no_grad():
        got = model.generate(**inputs, **flags)
    assert ran == [1]
    assert graphs.replays - replays == got.shape[1] - 150  # new tokens - 1, plus the step read too late
    monkeypatch.setattr(modeling, "samples_ahead", lambda *args, **kw: False)
    with torch.no_grad():
        expected = model.generate(**inputs, **flags, disable_compile=True)
    assert ran == [1] and torch.equal(got, expected)
    assert expected.shape[1] <= 150 + 21 and (expected[:, 150:] == 0).any()  # stopped early, one row padded


def _second_call(model):
    """Captures and compiled graphs counted before and after a second call of the same captured prompt length."""
    from torch._dynamo.utils import counters

    from infinitevl_hf.speed import decode_graphs_of

    _greedy(model, _text(seed=5))
    graphs = decode_graphs_of(model)
    captures, frames = graphs.captures, counters["stats"]["unique_graphs"]
    _greedy(model, _text(length=180, seed=6))  # another prompt of the same captured length (256)
    return (captures, graphs.captures), (frames, counters["stats"]["unique_graphs"])


def test_a_second_call_captures_nothing(model):
    (captures, captures_after), _ = _second_call(model)
    assert captures_after == captures


def test_a_second_call_compiles_nothing(model):
    _, (frames, frames_after) = _second_call(model)
    assert frames_after == frames


def test_a_second_image_call_captures_nothing():
    """A model's first image call lays out the vision weights before its graphs record where the weights are."""
    from infinitevl_hf.speed import decode_graphs_of

    fresh = _build()
    _greedy(fresh, _image(fresh))
    captures = decode_graphs_of(fresh).captures
    _greedy(fresh, _image(fresh, seed=3))
    assert decode_graphs_of(fresh).captures == captures == 2


def test_rows_decode_through_kernels_alone_without_torch_compile():
    """At one row every op of the captured decode step is one of the package's kernels, and with more rows the
    package's kernels sit between cuBLAS's products: a fresh model's first text calls, of one row and then of three,
    compile no graph."""
    from torch._dynamo.utils import counters

    from infinitevl_hf.speed import decode_graphs_of

    fresh = _build()
    frames = counters["stats"]["unique_graphs"]
    _greedy(fresh, _text(seed=41))
    assert decode_graphs_of(fresh).captures == 2  # the prompt and the decode step
    assert counters["stats"]["unique_graphs"] == frames
    (decoder,) = [slot.decoder for (rows, *_), slot in decode_graphs_of(fresh).slots.items() if rows == 1]
    assert decoder.decode_step is not None and not decoder.decode_step.compiled
    _greedy(fresh, _text(rows=3, seed=42))
    assert counters["stats"]["unique_graphs"] == frames
    (decoder,) = [slot.decoder for (rows, *_), slot in decode_graphs_of(fresh).slots.items() if rows == 3]
    assert decoder.decode_step is not None and not decoder.decode_step.compiled


def test_batched_rows_equal_the_rows_alone(model):
    """Rows of a left-padded batch decode to the tokens of each row alone. The prompts stay within
    `gated_deltanet.RECURRENT_MAX_TOKENS` (64), where a Gated DeltaNet runs its exact one-token recurrence over
    any padding: longer ones go through fla's chunked kernels, whose float32 products run in TF32, so a prompt
    that a captured graph pads into a longer bucket is chunked otherwise than the same prompt alone and agrees
    with it to TF32 only (on one H200 a 79-token row's 38th token flipped at a top-2 margin of 0.0008)."""
    from infinitevl_hf.modeling.gated_deltanet import RECURRENT_MAX_TOKENS

    rows = [_text(length=40 + 6 * i, seed=10 + i)["input_ids"] for i in range(4)]
    assert max(r.shape[1] for r in rows) <= RECURRENT_MAX_TOKENS
    width = max(r.shape[1] for r in rows)
    ids = torch.stack([torch.cat([torch.zeros(width - r.shape[1], dtype=torch.long, device="cuda"), r[0]]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - r.shape[1], dtype=torch.long, device="cuda"),
                                   torch.ones(r.shape[1], dtype=torch.long, device="cuda")]) for r in rows])
    both = _greedy(model, dict(input_ids=ids, attention_mask=mask), pad_token_id=0)
    for i, row in enumerate(rows):
        assert torch.equal(both[i, width - row.shape[1]:], _greedy(model, dict(input_ids=row))[0])


def _generate_asking_for_fallbacks(model, caplog):
    """generate() with output_attentions, then with disable_compile: graph replays before, the graphs, the log."""
    from infinitevl_hf.speed import decode_graphs_of

    graphs = decode_graphs_of(model)
    logging.Logger.warning_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="infinitevl_hf.speed.generation"):
        replays = graphs.replays
        model.generate(**_text(), max_new_tokens=4, do_sample=False, output_attentions=True,
                       return_dict_in_generate=True)
        model.generate(**_text(), max_new_tokens=4, do_sample=False, disable_compile=True)
    return replays, graphs, " ".join(r.getMessage() for r in caplog.records)


def test_fallbacks_are_taken(model, caplog):
    replays, graphs, _ = _generate_asking_for_fallbacks(model, caplog)
    assert graphs.replays == replays


def test_fallbacks_are_logged(model, caplog):
    _, _, said = _generate_asking_for_fallbacks(model, caplog)
    assert "output_attentions" in said and "disable_compile" in said


def test_the_module_path_joins_its_projections_after_the_layout_with_the_same_tokens(monkeypatch):
    """disable_compile=True lays the weights out as the graphs do; its decode then runs each layer's input
    projections as one product (`joined_linear`) with the input norm in front of it and a Gated DeltaNet's
    convolutions inside it, the post-attention add and norm inside the MLP's gate/up product and its residual
    added in its down product, and writes its states in place, with the tokens of the plain per-module
    calls (a greedy loop over the weights as built, before any generate())."""
    from infinitevl_hf import InfiniteVLCache
    from infinitevl_hf.modeling import gated_deltanet
    from infinitevl_hf.modeling.compat import CACHE_KWARG
    from infinitevl_hf.modeling.joined_linear import joined_weight
    from infinitevl_hf.modeling.rms_norm import InfiniteVLRMSNorm

    model = _build()
    mixer = next(layer.self_attn for layer in model.model.language_model.layers if hasattr(layer.self_attn, "a_proj"))
    six = (mixer.q_proj, mixer.k_proj, mixer.v_proj, mixer.a_proj, mixer.b_proj, mixer.g_proj)
    assert joined_weight(six) is None
    inputs = _text(seed=5)
    cache = InfiniteVLCache(model.config)
    tokens = []
    with torch.no_grad():
        logits = model(**inputs, use_cache=True, **{CACHE_KWARG: cache}).logits[:, -1]
        for _ in range(NEW):
            tokens.append(logits.argmax(-1, keepdim=True))
            logits = model(input_ids=tokens[-1], use_cache=True, **{CACHE_KWARG: cache}).logits[:, -1]
    plain = torch.cat([inputs["input_ids"], *tokens], dim=1)
    separate_convs, norm_ops = [], []
    group = gated_deltanet.causal_conv1d_group
    monkeypatch.setattr(gated_deltanet, "causal_conv1d_group", lambda *a, **k: (separate_convs.append(1), group(*a, **k))[1])
    norm, add_norm = InfiniteVLRMSNorm.forward, InfiniteVLRMSNorm.add_then_norm
    monkeypatch.setattr(InfiniteVLRMSNorm, "forward", lambda self, x: (norm_ops.append(x.shape[-2]), norm(self, x))[1])
    monkeypatch.setattr(InfiniteVLRMSNorm, "add_then_norm",
                        lambda self, r, d: (norm_ops.append(d.shape[-2]), add_norm(self, r, d))[1])
    assert torch.equal(_greedy(model, inputs, disable_compile=True), plain)
    assert joined_weight(six) is not None
    gdn_layers = sum(kind == "linear_attention" for kind in model.config.text_config.layer_types)
    assert len(separate_convs) == gdn_layers  # the prompt's; each decode step's ran inside the projection
    assert norm_ops.count(1) == NEW - 1  # at decode only the final norm: the layers' ran inside their products


def _quantized_or_lora(model, kind):
    """A copy of the model with torchao int8 weight-only linear layers, or with random LoRA adapters."""
    import copy

    other = copy.deepcopy(model)
    other.__dict__.pop("_decode_graphs", None)
    if kind == "torchao-int8":
        pytest.importorskip("torchao")  # in the `test` extra; optional beside CUDA
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(other.model.language_model, Int8WeightOnlyConfig())
        return other
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    lora = LoraConfig(r=4, target_modules=["q_proj", "up_proj"], init_lora_weights=False)
    return get_peft_model(other, lora).base_model.model.eval()


@pytest.mark.parametrize("kind", ["torchao-int8", "lora"])
def test_a_model_the_compiled_step_cannot_read_replays_its_modules_captured(model, kind, caplog):
    """Quantized or LoRA layers: generate() captures the module path itself (no compiled step), gives the module
    path's tokens and says why once."""
    from infinitevl_hf.speed import decode_graphs_of

    other = _quantized_or_lora(model, kind)
    logging.Logger.warning_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="infinitevl_hf.speed.generation"):
        fast = _greedy(other, _text(seed=21))
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "module path captured in a CUDA graph" in said, said
    assert decode_graphs_of(other).replays == NEW - 1
    assert torch.equal(fast, _greedy(other, _text(seed=21), disable_compile=True))


_FRESH_PROCESS = """
import json, sys, threading
sys.path.insert(0, "tests/gpu")
import torch
from triton import knobs
import infinitevl_hf.speed.compile_ahead as ahead
import infinitevl_hf.speed.graph_capture as capture
import test_gpu_generate as t

ahead_counts, compiled = [], {"main": [], "workers": []}
original = ahead.compile_ahead
capture.compile_ahead = lambda run: ahead_counts.append(original(run)) or ahead_counts[-1]
main = threading.get_ident()

def count(*, key, fn, **kwargs):
    compiled["main" if threading.get_ident() == main else "workers"].append(f"{fn.module}.{fn.name}/{key}")

knobs.runtime.jit_post_compile_hook = count
model = t._build()
inputs = t._image(model)
fast = t._greedy(model, inputs)
first = {where: len(keys) for where, keys in compiled.items()}
reference = t._greedy(model, inputs, disable_compile=True)
twice = sorted(set(compiled["main"]) & set(compiled["workers"]))
print(json.dumps({"equal": bool(torch.equal(fast, reference)), "ahead": ahead_counts, "first_call": first,
                  "compiled_twice": twice}))
"""


def test_a_fresh_process_compiles_its_kernels_ahead_and_gives_the_module_path_tokens(tmp_path):
    """With an empty Triton cache, the first call's captures compile their Triton kernels on worker threads before
    their warm-up runs (`speed.compile_ahead`), and the tokens equal the module path's."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
               PYTHONPATH=os.pathsep.join([str(root / "src"), str(root / "tests"), os.environ.get("PYTHONPATH", "")]))
    env.pop("INFINITEVL_COMPILE_AHEAD", None)
    done = subprocess.run([sys.executable, "-c", _FRESH_PROCESS], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["equal"], result
    assert len(result["ahead"]) == 2 and all(n is not None for n in result["ahead"]), result  # prompt and decode step
    assert sum(result["ahead"]) > 0 and result["first_call"]["workers"] >= sum(result["ahead"]), result
    assert result["compiled_twice"] == [], result  # what the workers compiled, the real launches found compiled
