"""`from_pretrained(..., tp_plan="auto")` over two CPU processes (gloo) gives the single-process logits and tokens."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from helpers import image_inputs, text_ids, tiny_model
from infinitevl_hf.modeling.tensor_parallel import HEAD_STYLE, TEXT_TP_PLAN

HERE = Path(__file__).resolve().parent
CHECKOUT_SRC = HERE.parents[1] / "src"  # the checkout under test, not whatever copy is installed


def test_plan_splits_the_output_projection_by_rows():
    assert TEXT_TP_PLAN["layers.*.self_attn.o_proj"] == "rowwise"


def test_plan_splits_the_input_projections_by_columns():
    for proj in "qkvabg":
        assert TEXT_TP_PLAN[f"layers.*.self_attn.{proj}_proj"] == "colwise"


def test_plan_splits_the_short_convolutions_by_heads():
    for conv in "qkv":
        assert TEXT_TP_PLAN[f"layers.*.self_attn.{conv}_conv1d"] == HEAD_STYLE


def test_plan_splits_the_per_head_parameters_by_heads():
    assert TEXT_TP_PLAN["layers.*.self_attn"] == HEAD_STYLE  # A_log, dt_bias


def test_model_plan_gathers_the_lm_head_output():
    model = tiny_model()
    plan = model.tp_plan
    assert plan["lm_head"] == "colwise_gather_output"


def test_model_plan_keeps_the_shared_o_norm_whole():
    model = tiny_model()
    plan = model.tp_plan
    assert all(not key.endswith("o_norm") for key in plan)  # shared by the heads: kept whole on every rank


def test_two_cpu_processes_match_one(tmp_path):
    model = tiny_model(seed=3)  # sdpa, as from_pretrained picks in the workers
    model.save_pretrained(tmp_path)
    ids, pixels, grid = image_inputs(prefix=4, suffix=9)
    inputs = {
        "text": {"input_ids": text_ids(2, 14)},  # longer than the 8-token window
        "image": {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": grid},
    }
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CHECKOUT_SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(HERE / "tp_worker.py"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-8000:]
    sharded = torch.load(tmp_path / "tensor_parallel.pt")
    assert all(sharded["shards"].values()), sharded["shards"]
    with torch.no_grad():
        for name, kwargs in inputs.items():
            torch.testing.assert_close(sharded[f"{name}_logits"], model(**kwargs).logits, rtol=1e-5, atol=1e-5)
            expected = model.generate(**kwargs, max_new_tokens=6, do_sample=False)
            assert torch.equal(sharded[f"{name}_tokens"], expected)
