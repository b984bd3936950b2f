"""Recorded autotuning choices (`modeling/ops/tuned`): recorded from autotuners, seeded back only where the GPU,
fla and Triton match, only for the recorded keys and only as one of the kernel's own candidates."""

import importlib
import json
import sys
import textwrap

import pytest

pytest.importorskip("triton")

from infinitevl_hf.modeling.ops import tuned  # noqa: E402

KERNELS = textwrap.dedent('''
    import triton
    import triton.language as tl

    CONFIGS = [triton.Config({"BLOCK": 32}, num_warps=2), triton.Config({"BLOCK": 64}, num_warps=4, num_stages=2)]

    @triton.autotune(configs=CONFIGS, key=["n"])
    @triton.jit
    def scale_kernel(x, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x + offs, tl.load(x + offs, mask=offs < n) * 2, mask=offs < n)

    @triton.heuristics({"EVEN": lambda args: args["n"] % 32 == 0})
    @triton.autotune(configs=CONFIGS, key=["n"])
    @triton.jit
    def even_kernel(x, n, BLOCK: tl.constexpr, EVEN: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x + offs, tl.load(x + offs, mask=offs < n) + 1, mask=offs < n)
''')
GPU = "Test GPU 9000"


@pytest.fixture
def kernels(tmp_path, monkeypatch):
    """A module of two autotuned kernels (one under `triton.heuristics`), imported fresh as `tunedfake_kernels`."""
    (tmp_path / "tunedfake_kernels.py").write_text(KERNELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("tunedfake_kernels", None)
    module = importlib.import_module("tunedfake_kernels")
    yield module
    sys.modules.pop("tunedfake_kernels", None)


def test_autotuners_are_found_under_heuristics_by_module_and_function(kernels):
    found = tuned.autotuners("tunedfake")
    assert set(found) == {"tunedfake_kernels:scale_kernel", "tunedfake_kernels:even_kernel"}
    assert found["tunedfake_kernels:even_kernel"] is kernels.even_kernel.fn


def test_a_recording_seeds_the_kernels_own_candidates_for_its_keys(kernels, tmp_path):
    scale, even = kernels.scale_kernel, kernels.even_kernel.fn
    scale.cache[(4096, "torch.bfloat16")] = scale.configs[1]
    even.cache[(128,)] = even.configs[0]
    path = tuned.record(GPU, tmp_path / "test_gpu.json", prefix="tunedfake")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging file left
    recording = json.loads(path.read_text())
    assert recording["gpu"] == GPU and set(recording["kernels"]) == {"tunedfake_kernels:scale_kernel",
                                                                       "tunedfake_kernels:even_kernel"}
    scale.cache.clear()
    even.cache.clear()
    assert tuned.seed(recording, GPU) == (2, None)
    assert scale.cache == {(4096, "torch.bfloat16"): scale.configs[1]}
    assert scale.cache[(4096, "torch.bfloat16")] is scale.configs[1]  # the candidate itself, not a copy
    assert even.cache[(128,)] is even.configs[0]


def test_a_choice_already_made_is_kept(kernels, tmp_path):
    scale = kernels.scale_kernel
    scale.cache[(64,)] = scale.configs[1]
    recording = json.loads(tuned.record(GPU, tmp_path / "r.json", prefix="tunedfake").read_text())
    scale.cache[(64,)] = scale.configs[0]  # chosen in this process since
    assert tuned.seed(recording, GPU) == (0, None)
    assert scale.cache[(64,)] is scale.configs[0]


def test_configs_that_are_not_candidates_and_unknown_kernels_are_skipped(kernels):
    scale = kernels.scale_kernel
    config = {"kwargs": {"BLOCK": 128}, "num_warps": 8, "num_stages": 3, "num_ctas": 1, "maxnreg": None}
    fla_version, triton_version = tuned._versions()
    recording = {"format": tuned.FORMAT, "gpu": GPU, "fla": fla_version, "triton": triton_version, "kernels": {
        "tunedfake_kernels:scale_kernel": [{"key": [64], "config": config}],
        "tunedfake_kernels:missing_kernel": [{"key": [64], "config": config}],
        "tunedfake_missing_module:kernel": [{"key": [64], "config": config}],
    }}
    assert tuned.seed(recording, GPU) == (0, None)
    assert scale.cache == {}


@pytest.mark.parametrize("field, value", [("gpu", "Other GPU"), ("fla", "0.0.1"), ("triton", "1.0.0")])
def test_a_recording_from_another_gpu_or_version_seeds_nothing_and_says_why(kernels, tmp_path, field, value):
    kernels.scale_kernel.cache[(64,)] = kernels.scale_kernel.configs[1]
    recording = json.loads(tuned.record(GPU, tmp_path / "r.json", prefix="tunedfake").read_text())
    kernels.scale_kernel.cache.clear()
    recording[field] = value
    count, reason = tuned.seed(recording, GPU)
    assert count == 0 and kernels.scale_kernel.cache == {}
    assert value in reason and GPU in reason


def test_a_recording_made_under_other_fla_switches_seeds_nothing(kernels, tmp_path, monkeypatch):
    kernels.scale_kernel.cache[(64,)] = kernels.scale_kernel.configs[1]
    recording = json.loads(tuned.record(GPU, tmp_path / "r.json", prefix="tunedfake").read_text())
    assert recording["fla_env"] == {}
    kernels.scale_kernel.cache.clear()
    monkeypatch.setenv("FLA_USE_TMA", "1")  # selects another kernel variant under the same tuning key
    count, reason = tuned.seed(recording, GPU)
    assert count == 0 and "FLA_USE_TMA" in reason and kernels.scale_kernel.cache == {}


def test_malformed_entries_are_skipped_and_the_rest_seeded(kernels, tmp_path):
    scale = kernels.scale_kernel
    scale.cache[(64,)] = scale.configs[1]
    recording = json.loads(tuned.record(GPU, tmp_path / "r.json", prefix="tunedfake").read_text())
    scale.cache.clear()
    entries = recording["kernels"]["tunedfake_kernels:scale_kernel"]
    entries[:0] = [{"config": entries[0]["config"]}, {"key": [[1, 2]], "config": entries[0]["config"]}, "junk"]
    assert tuned.seed(recording, GPU) == (1, None)
    assert scale.cache == {(64,): scale.configs[1]}


def test_seed_autotuners_reads_the_packaged_file_once_and_obeys_the_switches(kernels, tmp_path, monkeypatch):
    kernels.scale_kernel.cache[(64,)] = kernels.scale_kernel.configs[1]
    monkeypatch.setattr(tuned, "TUNED_DIR", tmp_path)
    assert tuned.record(GPU, prefix="tunedfake") == tmp_path / "test_gpu_9000.json"
    for env, value in ((tuned.SWITCH_ENV, "0"), ("FLA_CACHE_MODE", "strict")):
        kernels.scale_kernel.cache.clear()
        tuned.seed_autotuners.cache_clear()
        with monkeypatch.context() as scoped:
            scoped.setenv(env, value)
            assert tuned.seed_autotuners(GPU) == 0
        assert kernels.scale_kernel.cache == {}
    tuned.seed_autotuners.cache_clear()
    assert tuned.seed_autotuners(GPU) == 1
    kernels.scale_kernel.cache.clear()
    assert tuned.seed_autotuners(GPU) == 1 and kernels.scale_kernel.cache == {}  # once per process
    tuned.seed_autotuners.cache_clear()
    assert tuned.seed_autotuners("A GPU nothing was recorded on") == 0
    tuned.recording_path(GPU).write_text("{not json")
    tuned.seed_autotuners.cache_clear()
    assert tuned.seed_autotuners(GPU) == 0
    tuned.seed_autotuners.cache_clear()


def test_recording_paths_name_the_gpu():
    assert tuned.recording_path("NVIDIA H200").name == "nvidia_h200.json"
    assert tuned.recording_path("NVIDIA GeForce RTX 4090 (laptop)").name == "nvidia_geforce_rtx_4090_laptop.json"


def test_the_packaged_recordings_are_well_formed():
    files = sorted(tuned.TUNED_DIR.glob("*.json"))
    assert files, "no recorded autotuning choices are packaged"
    for path in files:
        recording = json.loads(path.read_text())
        assert recording["format"] == tuned.FORMAT and isinstance(recording["fla_env"], dict)
        assert tuned.recording_path(recording["gpu"]).name == path.name
        assert recording["kernels"], path.name
        for name, entries in recording["kernels"].items():
            module, _, function = name.partition(":")
            assert module.startswith("fla.") and function, name
            for entry in entries:
                assert isinstance(entry["key"], list) and entry["key"], name
                assert set(entry["config"]) == {"kwargs", "num_warps", "num_stages", "num_ctas", "maxnreg"}, name
