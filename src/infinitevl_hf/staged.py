"""The one writer behind every folder this package produces: write beside, verify, swap.

Conversion, export, the tiny checkpoint and saved streams all go through here, so that:

- nothing half-written is ever visible: a whole folder is built in a hidden sibling
  (`.NAME.converting-PID-HEX`), flushed to disk, then renamed onto `NAME`; an old `NAME` is first renamed
  aside (`.NAME.replaced-PID-HEX`) and removed only once the new one is in place (restored on failure);
- nothing the package did not write is replaced: an existing non-empty folder is replaced only when it carries
  the marker file this writer leaves in every folder it writes (`MARKER`), and only with `overwrite`;
- an output never is, contains or lies inside one of its sources;
- leftovers of killed runs (a staging or set-aside sibling whose process is gone) are removed, or, when the
  kill came between the two renames, the set-aside folder is put back;
- folders get mode 0755 (not `tempfile.mkdtemp`'s 0700).

`staged_files` is the same idea for a few files inside a folder that may hold other files (a saved stream
state): the new files are written under fresh names, the manifest that names them is swapped in last with one
atomic `os.replace`, and only then are the files of the old manifest removed. Other files are never touched.

```python
>>> with staged_folder("out/", overwrite=True, sources=["ckpt/"]) as stage:  # doctest: +SKIP
...     model.save_pretrained(stage)
```
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

MARKER = ".infinitevl-hf"
FOLDER_MODE = 0o755
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>converting|replaced)-(?P<pid>\d+)-[0-9a-f]{8}$")


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, then the folders themselves, so a rename publishes data that is on disk."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


def make_folder(path: Path) -> Path:
    """`mkdir -p` whose new folders get `FOLDER_MODE`, whatever the umask or the caller (mkdtemp gives 0700)."""
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
        os.chmod(folder, FOLDER_MODE)
    return path


def written_by_us(folder: Path) -> bool:
    """Whether `folder` was written by this writer (it holds the marker file)."""
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8")).get("written_by") == "infinitevl-hf"
    except (OSError, ValueError, AttributeError):
        return False


def check_apart(output: Path, sources: Iterable[str | os.PathLike], what: str = "output") -> None:
    """Refuse an `output` that is one of `sources`, lies inside one, or contains one (writing it would destroy it)."""
    out = Path(output).expanduser().resolve()
    for source in sources:
        src = Path(source).expanduser().resolve()
        if out == src:
            raise ValueError(f"The {what} {str(output)!r} is the source folder itself; choose another folder.")
        if out.is_relative_to(src):
            raise ValueError(f"The {what} {str(output)!r} lies inside the source folder {str(source)!r}; choose another folder.")
        if src.is_relative_to(out):
            raise ValueError(f"The {what} {str(output)!r} contains the source folder {str(source)!r}; choose another folder.")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def clean_leftovers(output: Path) -> list[Path]:
    """Remove the staging / set-aside siblings of `output` that a killed run left; put a set-aside folder back when
    `output` itself is missing (the kill came between the two renames). Returns what was removed or restored."""
    output = Path(output)
    if not output.parent.is_dir():
        return []
    handled = []
    for sibling in sorted(output.parent.iterdir()):
        match = _LEFTOVER.match(sibling.name)
        if not match or match["name"] != output.name or _pid_alive(int(match["pid"])) or not sibling.is_dir():
            continue
        if match["kind"] == "replaced" and not output.exists():
            sibling.rename(output)
        else:
            shutil.rmtree(sibling, ignore_errors=True)
        handled.append(sibling)
    return handled


def _sibling(output: Path, kind: str) -> Path:
    return output.parent / f".{output.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def check_replaceable(output: Path, overwrite: bool, what: str = "Output folder", flag: str = "overwrite=True / --overwrite") -> None:
    """Raise unless `output` is absent, an empty folder, or (with `overwrite`) a folder this package wrote."""
    if not output.exists():
        return
    if not output.is_dir():
        raise FileExistsError(f"{what} {str(output)!r} exists and is a file, not a folder.")
    if not any(output.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{what} {str(output)!r} exists and is not empty (pass {flag} to replace it).")
    if not written_by_us(output):
        raise FileExistsError(
            f"Refusing to replace {str(output)!r}: it is not a folder infinitevl-hf wrote (no {MARKER} file), so "
            "replacing it could destroy files that are not ours. Remove it yourself or choose another folder."
        )
    if Path.cwd().resolve().is_relative_to(output.resolve()):
        raise FileExistsError(f"Refusing to replace {str(output)!r}: it holds the current working folder.")


@contextmanager
def staged_folder(output: str | os.PathLike, overwrite: bool = False, sources: Iterable[str | os.PathLike] = (),
                  kind: str = "checkpoint", what: str = "Output folder",
                  flag: str = "overwrite=True / --overwrite") -> Iterator[Path]:
    """Yield an empty staging folder beside `output`; when the block ends without error, put it at `output`.

    Refuses (before anything is written) an output that is, contains or lies inside one of `sources`, and an
    existing non-empty `output` unless `overwrite` and it carries this writer's marker. On any error or
    interruption the staging folder is removed and `output` is as it was."""
    output = Path(output).expanduser().absolute()
    check_apart(output, sources, what=what.lower())
    clean_leftovers(output)
    check_replaceable(output, overwrite, what=what, flag=flag)
    make_folder(output.parent)
    stage = _sibling(output, "converting")
    stage.mkdir()
    os.chmod(stage, FOLDER_MODE)
    try:
        yield stage
        (stage / MARKER).write_text(json.dumps({"written_by": "infinitevl-hf", "kind": kind}) + "\n", encoding="utf-8")
        fsync_tree(stage)
        _swap_in(stage, output)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _swap_in(stage: Path, output: Path) -> None:
    if output.exists():
        aside = _sibling(output, "replaced")
        output.rename(aside)
        try:
            stage.rename(output)
        except BaseException:
            aside.rename(output)
            raise
        _fsync(output.parent)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        stage.rename(output)
        _fsync(output.parent)


@contextmanager
def staged_files(folder: str | os.PathLike, manifest: str, old_files: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a staging folder inside `folder`; when the block ends without error, move the files written there
    into `folder`, the `manifest` file last (one atomic `os.replace`, the moment the new files become the
    current ones), then delete `old_files` (those of the previous manifest that the new one does not reuse).

    The staged files other than `manifest` must have names not already in `folder` (fresh names), so that until
    the manifest is replaced the previous files stay whole. Files of `folder` other than these are never touched."""
    folder = Path(folder).expanduser().absolute()
    make_folder(folder)
    for leftover in folder.glob(f".{manifest}.converting-*"):  # a killed save's staging folder
        match = _LEFTOVER.match(leftover.name)
        if match and not _pid_alive(int(match["pid"])):
            shutil.rmtree(leftover, ignore_errors=True)
    stage = folder / f".{manifest}.converting-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    os.chmod(stage, FOLDER_MODE)
    moved: list[Path] = []
    try:
        yield stage
        fsync_tree(stage)
        names = sorted(p.name for p in stage.iterdir() if p.name != manifest)
        if not (stage / manifest).is_file():
            raise FileNotFoundError(f"Nothing staged as {manifest!r}.")
        clashes = [name for name in names if (folder / name).exists()]
        if clashes:
            raise FileExistsError(f"Refusing to overwrite {clashes} in {str(folder)!r}: staged files need fresh names.")
        for name in names:
            os.replace(stage / name, folder / name)
            moved.append(folder / name)
        _fsync(folder)
        os.replace(stage / manifest, folder / manifest)
        moved = []
        _fsync(folder)
        for name in set(old_files) - set(names) - {manifest}:
            (folder / name).unlink(missing_ok=True)
    except BaseException:
        for path in moved:
            path.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


__all__ = ["MARKER", "FOLDER_MODE", "staged_folder", "staged_files", "check_apart", "check_replaceable",
           "clean_leftovers", "make_folder", "written_by_us", "fsync_tree"]
