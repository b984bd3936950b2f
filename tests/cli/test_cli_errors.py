"""The `infinitevl` command as a new user meets it: every bad input is one `error:` line and exit status 2."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import infinitevl_hf
from infinitevl_hf import cli
from infinitevl_hf.tiny import tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("cli-errors") / "tiny")


def _one_line_error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if line.strip() and not line.startswith(("Loading", "Writing"))]  # bars of the test's own loading
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _variant(tiny, tmp_path, name, change) -> Path:
    folder = tmp_path / name
    shutil.copytree(tiny, folder)
    change(folder)
    return folder


def _keys(folder) -> list[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return list(f.keys())


def _index(folder, shard_of) -> None:
    keys = _keys(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {k: shard_of(i) for i, k in enumerate(keys)}}))


@pytest.mark.parametrize("name, change", [
    ("garbage", lambda d: (d / "model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{nonsense")),
    ("cut", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:4000])),
], ids=["corrupt", "truncated"])
def test_an_unreadable_safetensors_file_is_named(capsys, tiny, tmp_path, name, change):
    folder = _variant(tiny, tmp_path, name, change)
    line = _one_line_error(capsys, ["generate", "hi", "--model", str(folder)])
    assert "not a readable safetensors file" in line and str(folder) in line


def _misindexed(d):
    _index(d, lambda i: "model.safetensors")
    data = json.loads((d / "model.safetensors.index.json").read_text())
    data["weight_map"]["lm_head.weight.not_there"] = "model.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(data))


def _outside(d):
    (d.parent / "elsewhere").mkdir()
    shutil.move(d / "model.safetensors", d.parent / "elsewhere" / "model.safetensors")
    shutil.copy(d.parent / "elsewhere" / "model.safetensors", d / "model.safetensors")  # keys readable for the index
    _index(d, lambda i: "../elsewhere/model.safetensors")
    (d / "model.safetensors").unlink()


def test_a_mis_indexed_shard_is_named(capsys, tiny, tmp_path):
    folder = _variant(tiny, tmp_path, "misindexed", _misindexed)
    assert "mis-indexed" in _one_line_error(capsys, ["generate", "hi", "--model", str(folder)])


def test_a_shard_outside_the_checkpoint_folder_is_named(capsys, tiny, tmp_path):
    folder = _variant(tiny, tmp_path, "outside", _outside)
    line = _one_line_error(capsys, ["generate", "hi", "--model", str(folder)])
    assert "'../elsewhere/model.safetensors', which is not a file in the checkpoint folder" in line


def _export_onto_a_full_disk(capsys, tiny, tmp_path, monkeypatch):
    real_copy = shutil.copy2

    def full_disk(src, dst, *args, **kwargs):
        if str(src).endswith(".safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copy2", full_disk)
    return _one_line_error(capsys, ["export", str(tiny), str(tmp_path / "out")])


def test_a_full_disk_is_one_line_saying_free_some_space(capsys, tiny, tmp_path, monkeypatch):
    line = _export_onto_a_full_disk(capsys, tiny, tmp_path, monkeypatch)
    assert line.startswith("error: no space left on device while writing ") and "free some space" in line


def test_a_full_disk_leaves_nothing(capsys, tiny, tmp_path, monkeypatch):
    _export_onto_a_full_disk(capsys, tiny, tmp_path, monkeypatch)
    assert sorted(os.listdir(tmp_path)) == []


def test_devices(capsys, tiny):
    missing = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    assert "--device cuda" in _one_line_error(capsys, ["generate", "hi", "--model", str(tiny), "--device", missing])
    assert "unknown --device 'tpu9'" in _one_line_error(capsys, ["generate", "hi", "--model", str(tiny), "--device", "tpu9"])
    assert "--device" in _one_line_error(capsys, ["--model", str(tiny), "--device", "tpu9", "--frames", "2"])


def test_a_checkpoint_that_is_not_infinitevl(capsys, tiny, tmp_path):
    from transformers import AutoModelForImageTextToText

    from infinitevl_hf.demo import teacher_from

    qwen, _, _ = teacher_from(AutoModelForImageTextToText.from_pretrained(tiny))
    qwen.save_pretrained(tmp_path / "qwen")
    line = _one_line_error(capsys, ["--model", str(tmp_path / "qwen"), "--frames", "2", "--no-plot"])
    assert "is not an InfiniteVL checkpoint: its model_type is 'qwen2_5_vl'" in line and "infinitevl convert" in line
    assert "not an InfiniteVL checkpoint" in _one_line_error(capsys, ["generate", "hi", "--model", str(tmp_path / "qwen")])
    assert "not an InfiniteVL checkpoint" in _one_line_error(capsys, ["stream", str(tmp_path / "qwen"), "--video", "x.mp4"])


@pytest.fixture(scope="module")
def quiet_main_job():
    """One quiet main job (shared by the tests): what it printed to stdout and to stderr."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        cli.run(["--frames", "2", "--no-compare", "--no-plot", "--quiet"])
    return out.getvalue(), err.getvalue()


def test_main_job_quiet_says_where_the_tiny_checkpoint_is(quiet_main_job):
    out, _ = quiet_main_job
    assert "Tiny checkpoint: " in out and "removed when the command ends" in out


def test_main_job_quiet_shows_the_answer_with_the_random_weights_note(quiet_main_job):
    out, _ = quiet_main_job
    answer = next(line for line in out.splitlines() if line.startswith("A: "))
    assert answer.startswith("A: '") and answer.endswith("(random weights: the text is meaningless)")  # repr and note


def test_main_job_quiet_silences_load_bars(quiet_main_job):
    out, err = quiet_main_job
    for bar in ("Loading weights", "Writing model shards", "streaming frames"):
        assert bar not in out + err, bar


def test_standalone_stream_entry_has_one_line_errors(tmp_path):
    src = str(Path(infinitevl_hf.__file__).resolve().parents[1])  # the checkout under test, not another install
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "infinitevl_hf.streaming_cli", str(tmp_path / "nowhere" / "model"),
                             "--video", "x.mp4"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert lines == [f"error: model folder not found: {str(tmp_path / 'nowhere' / 'model')!r}"], result.stderr
    assert "Traceback" not in result.stderr
