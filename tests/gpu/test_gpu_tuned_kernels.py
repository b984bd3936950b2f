"""Recorded autotuning choices on a real GPU: a fresh process seeds fla's autotuners from the recording of this
GPU, and a 4B prompt then runs without any autotuner looking for a choice (no config timed, no disk lookup) for
the recorded kernels; with seeding off the same prompt does look. Marked `gpu`; skipped only where CUDA is absent."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytestmark = [pytest.mark.gpu, needs_cuda]

OFFICIAL = Path(__file__).resolve().parents[1] / "data" / "official_config.json"
PROMPT = f'''
import json, torch
from triton.runtime.autotuner import Autotuner

lookups = []
for method in ("_bench", "check_disk_cache"):
    def counted(self, *args, _original=getattr(Autotuner, method), **kwargs):
        lookups.append(f"{{self.base_fn.__module__}}:{{self.base_fn.__name__}}")
        return _original(self, *args, **kwargs)
    setattr(Autotuner, method, counted)

from infinitevl_hf import InfiniteVLConfig, InfiniteVLForConditionalGeneration
from infinitevl_hf.modeling.ops import dispatch, tuned

config = InfiniteVLConfig(**json.loads(open({str(OFFICIAL)!r}).read()))
config._attn_implementation = "sdpa"
with torch.device("cuda"):
    model = InfiniteVLForConditionalGeneration(config).to(torch.bfloat16).eval()
ids = torch.randint(0, 150000, (1, 300), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
with torch.no_grad():
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
torch.cuda.synchronize()
fla = dispatch.select("chunk_gated_delta_rule", ids.float()) == "fla"
print(json.dumps({{"fla": fla, "seeded": tuned.seed_for_current_device(), "lookups": sorted(set(lookups))}}))
'''


def _prompt_in_fresh_process(**env) -> dict:
    run = subprocess.run([sys.executable, "-c", PROMPT], capture_output=True, text=True, timeout=900,
                         env={**os.environ, **env})
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_a_fresh_process_runs_the_recorded_kernels_without_autotuning():
    from infinitevl_hf.modeling.ops import tuned

    seeded = _prompt_in_fresh_process()
    if not seeded["fla"]:
        assert seeded["seeded"] == 0  # no fla: nothing to seed, nothing autotuned by fla
        return
    path = tuned.recording_path(torch.cuda.get_device_name())
    recording = json.loads(path.read_text()) if path.is_file() else {}
    import fla
    import triton

    matches = ((recording.get("fla"), recording.get("triton"), recording.get("fla_env"))
               == (fla.__version__, triton.__version__, tuned._fla_env()))
    if not matches:
        assert seeded["seeded"] == 0, "a recording of another GPU or version was used"
        return
    recorded = set(recording["kernels"])
    assert seeded["seeded"] > 0
    assert not recorded & set(seeded["lookups"]), "recorded kernels still autotuned"
    unseeded = _prompt_in_fresh_process(INFINITEVL_TUNED_KERNELS="0")
    assert unseeded["seeded"] == 0
    assert recorded & set(unseeded["lookups"]), "without the recording the kernels autotune (the check can fail)"
