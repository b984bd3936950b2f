"""The staged writer on its own: whole or nothing, only its own folders, normal permissions."""

from __future__ import annotations

import os

import pytest

from infinitevl_hf import staged, tiny_checkpoint


def test_a_failure_inside_leaves_the_old_folder_and_no_leftovers(tmp_path):
    with staged.staged_folder(tmp_path / "out") as stage:
        (stage / "a.txt").write_text("old")
    with pytest.raises(RuntimeError, match="midway"):
        with staged.staged_folder(tmp_path / "out", overwrite=True) as stage:
            (stage / "a.txt").write_text("new")
            raise RuntimeError("midway")
    assert (tmp_path / "out" / "a.txt").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["out"]


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    with staged.staged_folder(tmp_path / "out") as stage:
        (stage / "a.txt").write_text("old")
    real_rename = os.rename

    def rename(src, dst):  # the new folder cannot be renamed in (e.g. the disk went away)
        if ".converting-" in str(src):
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        with staged.staged_folder(tmp_path / "out", overwrite=True) as stage:
            (stage / "a.txt").write_text("new")
    assert (tmp_path / "out" / "a.txt").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["out"]


def test_tiny_checkpoint_folders_are_0755_and_marked(tmp_path):
    old = os.umask(0o077)  # even under a strict umask the folders it creates are normal ones
    try:
        path = tiny_checkpoint(tmp_path / "deep" / "er" / "tiny")
    finally:
        os.umask(old)
    for folder in (path, path.parent, path.parent.parent):
        assert folder.stat().st_mode & 0o777 == 0o755, folder
    assert staged.written_by_us(path)
