"""The decode path of generate() is a plain function of (device, flags, model), tested without a GPU."""

import logging

import pytest
import torch
from torch import nn

from helpers import set_current_cuda_device, tiny_model
from infinitevl_hf.speed import decode_plan, plan_for_model

CUDA_OK = dict(device_type="cuda", dtype=torch.bfloat16)


def test_cuda_with_nothing_in_the_way_decodes_through_the_graph():
    plan = decode_plan(**CUDA_OK)
    assert plan.path == "graph" and plan.reason is None


@pytest.mark.parametrize(
    "flags,path,words",
    [
        (dict(device_type="cpu"), "dynamic", "cpu"),
        (dict(device_type="cpu", static_requested=True), "static", "cpu"),
        (dict(training=True), "dynamic", "training"),
        (dict(output_attentions=True), "dynamic", "output_attentions"),
        (dict(output_hidden_states=True), "static", "output_hidden_states"),
        (dict(disable_compile=True), "static", "disable_compile"),
        (dict(triton_available=False), "static", "Triton"),
        (dict(dtype=torch.float64), "static", "float64"),
        (dict(capture_problem="its decoder spans several devices"), "static", "several devices"),
    ],
    ids=["cpu", "cpu-static", "training", "attentions", "hidden-states", "disable-compile", "no-triton", "dtype",
         "not-capturable"],
)
def test_each_fallback_names_its_reason(flags, path, words):
    plan = decode_plan(**{**CUDA_OK, **flags})
    assert plan.path == path
    assert words in plan.reason


def test_a_model_the_compiled_step_cannot_read_replays_its_modules_captured():
    plan = decode_plan(**CUDA_OK, model_problem="lm_head carries LoRA adapters")
    assert (plan.path, plan.step) == ("graph", "modules") and "LoRA" in plan.reason


def test_a_model_without_graph_problems_replays_the_compiled_step():
    assert decode_plan(**CUDA_OK).step == "compiled"


def test_a_lora_model_replays_its_modules_captured_on_cuda():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj", "up_proj"])).base_model.model
    plan = plan_for_model(model, torch.device("cuda"))
    assert (plan.path, plan.step) == ("graph", "modules") and "LoRA" in plan.reason


def test_a_model_on_another_gpu_than_the_current_one_keeps_the_module_path(monkeypatch):
    """Graphs capture the current device's stream and Triton launches there: a model on cuda:1 while cuda:0 is
    current decodes through its modules, saying how to let the graphs serve it."""
    set_current_cuda_device(monkeypatch, 0)
    model = tiny_model()
    plan = plan_for_model(model, torch.device("cuda", 1))
    assert plan.path == "static" and "not on the current device cuda:0" in plan.reason
    assert "set_device(1)" in plan.reason
    here = plan_for_model(model, torch.device("cuda", 0))
    assert here.reason is None or "current device" not in here.reason


def test_a_layer_of_unknown_kernels_keeps_the_module_path_on_cuda():
    class Wrapped(nn.Linear):  # a LoRA or quantized layer whose forward is not F.linear
        pass

    model = tiny_model()
    assert plan_for_model(model, torch.device("cuda")).path in ("graph", "static")  # static without Triton
    mlp = model.model.language_model.layers[1].mlp
    mlp.up_proj = Wrapped(mlp.up_proj.in_features, mlp.up_proj.out_features, bias=False)
    plan = plan_for_model(model, torch.device("cuda"))
    assert plan.path == "static" and "Wrapped" in plan.reason and "CUDA graph" in plan.reason


def test_cpu_generate_says_once_why_it_decodes_through_the_module_path(caplog):
    model = tiny_model()
    ids = torch.randint(3, 80, (1, 5))
    logging.Logger.info_once.cache_clear()  # transformers' once-per-process memory of what it said
    with caplog.at_level(logging.INFO, logger="infinitevl_hf.speed.generation"):
        for _ in range(2):
            model.generate(ids, max_new_tokens=2, do_sample=False)
    said = [r.getMessage() for r in caplog.records if "decodes through the module path" in r.getMessage()]
    assert len(said) == 1 and "cpu" in said[0]


@pytest.mark.parametrize("kwargs", [dict(batch_sizes=(0,)), dict(batch_sizes=()), dict(prompt_tokens=0)])
def test_warmup_names_a_bad_argument(kwargs):
    with pytest.raises(ValueError, match="warmup"):
        tiny_model().warmup(**kwargs)
