"""The `infinitevl` command: main job, help, one-line errors, generate."""

from __future__ import annotations

import pytest

from infinitevl_hf import cli
from infinitevl_hf.modeling.ops.dispatch import triton_available
from infinitevl_hf.tiny import tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("cli") / "tiny")


def test_main_job_constant_vs_growing_cache(tmp_path, capsys):
    result = cli.run(["--frames", "6", "--quiet", "--plot", str(tmp_path / "plot.png")])
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "InfiniteVL cache" in out and "full-attention cache" in out
    frames = result.frames
    assert len(frames) == 6
    assert frames[0].infinitevl_bytes == frames[-1].infinitevl_bytes > 0
    teacher = [f.teacher_bytes for f in frames]
    assert all(b > a for a, b in zip(teacher, teacher[1:])), teacher
    assert teacher[-1] > frames[-1].infinitevl_bytes
    assert (result.plot is not None) == (tmp_path / "plot.png").exists()
    assert result.plot_note  # says where the plot went, or that plotting was skipped


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.run(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for word in ("generate", "export", "env", "--frames", "--model"):
        assert word in out


def _one_line_error(capsys, argv):
    assert cli.main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_missing_model_path(capsys, tmp_path):
    assert "not found" in _one_line_error(capsys, ["--model", str(tmp_path / "missing"), "--frames", "2"])


def test_bad_image(capsys, tmp_path, tiny):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    assert "cannot read image" in _one_line_error(capsys, ["generate", "hi", "--image", str(bad), "--model", str(tiny)])
    assert "image not found" in _one_line_error(capsys, ["generate", "hi", "--image", str(tmp_path / "no.png")])


def test_bad_flag(capsys):
    assert "--bogus" in _one_line_error(capsys, ["--bogus"])


def test_generate_prints_text(capsys, tiny):
    from infinitevl_hf.tiny import asset_path

    assert cli.main(["generate", "What is this?", "--image", str(asset_path("demo.png")), "--model", str(tiny),
                     "--max-new-tokens", "4"]) == 0
    text = cli.run(["generate", "Say something.", "--model", str(tiny), "--max-new-tokens", "4"])
    out = capsys.readouterr().out  # a random-weight answer is shown with repr (it may be only newlines) and a note
    assert isinstance(text, str) and f"{text!r}  (random weights: the text is meaningless)" in out


def _export(tiny, tmp_path):
    assert cli.main(["export", str(tiny), str(tmp_path / "out")]) == 0


def test_export_writes_the_remote_code(tmp_path, tiny):
    _export(tiny, tmp_path)
    assert (tmp_path / "out" / "modeling_infinitevl.py").is_file()
    assert (tmp_path / "out" / "processing_infinitevl.py").is_file()


def test_export_into_a_non_empty_folder_is_one_line_naming_overwrite(capsys, tmp_path, tiny):
    _export(tiny, tmp_path)
    assert "exists and is not empty" in _one_line_error(capsys, ["export", str(tiny), str(tmp_path / "out")])
    assert "--overwrite" in _one_line_error(capsys, ["export", str(tiny), str(tmp_path / "out")])


def test_env_lists_torch_beside_the_fla_kernels():
    info = cli.run(["env"])
    assert "torch" in info and "fla kernels" in info


def test_env_says_whether_fused_decode_is_available():
    info = cli.run(["env"])
    import torch

    assert info["fused decode"].startswith("unavailable") != (triton_available() and torch.cuda.is_available())
    if not torch.cuda.is_available():
        assert info["fused decode"].startswith("unavailable: no CUDA device")
