"""`export_checkpoint` never destroys what it did not write and never carries code that is not this package's."""

from __future__ import annotations

import json

import pytest
from helpers import tiny_model

from infinitevl_hf import export


@pytest.fixture
def source(tmp_path):
    folder = tmp_path / "home" / "ckpt"
    tiny_model().save_pretrained(folder, remote_code_files=False)
    return folder


def _tree(root):
    return sorted((p.relative_to(root).as_posix(), p.read_bytes() if p.is_file() else b"") for p in root.rglob("*"))


def test_overwrite_replaces_only_a_folder_this_package_wrote(source, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="not a folder infinitevl-hf wrote"):
        export.export_checkpoint(source, precious, overwrite=True)
    assert (precious / "thesis.tex").read_text() == "years of work"
    out = export.export_checkpoint(source, tmp_path / "out")
    (out / "extra.txt").write_text("x")
    export.export_checkpoint(source, out, overwrite=True)  # an earlier export is ours to replace
    assert not (out / "extra.txt").exists() and (out / "modeling_infinitevl.py").is_file()
    assert out.stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []  # no staging leftovers


@pytest.mark.parametrize("where", ["source", "parent", "inside"])
def test_output_that_is_holds_or_lies_in_the_source_is_refused(source, where):
    (source.parent / "sibling.txt").write_text("keep")
    out = {"source": source, "parent": source.parent, "inside": source / "sub"}[where]
    before = _tree(source.parent)
    match = {"source": "is the source folder", "parent": "contains the source", "inside": "lies inside the source"}[where]
    with pytest.raises(ValueError, match=match):
        export.export_checkpoint(source, out, overwrite=True)
    assert _tree(source.parent) == before


def export_with_foreign_code(source, tmp_path):
    (source / "evil.py").write_text("import os\nos.system('echo pwned')\n")
    (source / "sub").mkdir()
    (source / "sub" / "helper.py").write_text("x = 1\n")
    config = json.loads((source / "config.json").read_text())
    config["auto_map"] = {**config.get("auto_map", {}), "AutoModelForSequenceClassification": "evil.Model"}
    (source / "config.json").write_text(json.dumps(config))
    (source / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["evil.Tok", None]}, "model_max_length": 64}))
    (source / "preprocessor_config.json").write_text(json.dumps({"auto_map": {"AutoImageProcessor": "someone/repo--x.P"}}))
    dropped = []
    out = export.export_checkpoint(source, tmp_path / "out", dropped=dropped)
    return out, dropped


def test_foreign_code_files_are_left_out(source, tmp_path):
    out, _ = export_with_foreign_code(source, tmp_path)
    assert not (out / "evil.py").exists() and not (out / "sub" / "helper.py").exists()
    names = {p.name for p in out.glob("*.py")}
    from infinitevl_hf.modeling.remote_code import MODEL_ENTRIES, remote_code_files

    assert set(remote_code_files(MODEL_ENTRIES)) <= names and "evil.py" not in names


def test_foreign_auto_map_entries_are_left_out(source, tmp_path):
    out, _ = export_with_foreign_code(source, tmp_path)
    exported = json.loads((out / "config.json").read_text())["auto_map"]
    assert exported == export.AUTO_MAP
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())


def test_foreign_code_left_out_is_named(source, tmp_path):
    _, dropped = export_with_foreign_code(source, tmp_path)
    assert any("evil.py" in d for d in dropped) and any("sub/helper.py" in d for d in dropped)
    assert any("tokenizer_config.json" in d and "evil.Tok" in d for d in dropped)
    assert any("someone/repo--x.P" in d for d in dropped)
