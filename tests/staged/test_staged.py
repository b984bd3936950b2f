"""The staged writer on its own: whole or nothing, only its own folders, normal permissions."""

from __future__ import annotations

import os

import pytest

from infinitevl_hf import staged, tiny_checkpoint


def fail_inside_an_overwrite(tmp_path):
    with staged.staged_folder(tmp_path / "out") as stage:
        (stage / "a.txt").write_text("old")
    with pytest.raises(RuntimeError, match="midway"):
        with staged.staged_folder(tmp_path / "out", overwrite=True) as stage:
            (stage / "a.txt").write_text("new")
            raise RuntimeError("midway")


def test_a_failure_inside_leaves_the_old_folder(tmp_path):
    fail_inside_an_overwrite(tmp_path)
    assert (tmp_path / "out" / "a.txt").read_text() == "old"


def test_a_failure_inside_leaves_no_leftovers(tmp_path):
    fail_inside_an_overwrite(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["out"]


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


def tiny_checkpoint_under_a_strict_umask(tmp_path):
    old = os.umask(0o077)  # even under a strict umask the folders it creates are normal ones
    try:
        return tiny_checkpoint(tmp_path / "deep" / "er" / "tiny")
    finally:
        os.umask(old)


def test_tiny_checkpoint_folders_are_0755(tmp_path):
    path = tiny_checkpoint_under_a_strict_umask(tmp_path)
    for folder in (path, path.parent, path.parent.parent):
        assert folder.stat().st_mode & 0o777 == 0o755, folder


def test_tiny_checkpoint_folder_is_marked_as_ours(tmp_path):
    path = tiny_checkpoint_under_a_strict_umask(tmp_path)
    assert staged.written_by_us(path)
