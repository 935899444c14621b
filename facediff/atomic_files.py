"""Writing files and folders so that a crash, a full disk or Ctrl-C never leaves one half-written: everything is
written beside its destination first and renamed into place, which the operating system does in one step."""

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """
    Yield a temporary path beside `path` to write; once the block ends without error it replaces `path` in one
    rename, and on any error (a full disk, `path` a folder, Ctrl-C) it is removed: `path` is whole or untouched.

    Args:
        path (`str` or `os.PathLike`):
            The file to write.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        yield partial
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, content: dict) -> None:
    """
    Write `content` as indented JSON with sorted keys, atomically (`atomic_write`).

    Args:
        path (`str` or `os.PathLike`):
            The file to write.
        content (`dict`):
            What to write.
    """
    with atomic_write(path) as partial:
        partial.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


def replace_entries(staging: Path, target: Path, last: str | None = None) -> None:
    """
    Move every entry of `staging` into `target`, replacing entries of the same name and keeping the others.

    `last` (e.g. `model_index.json`) goes first out and last in, so that at no moment does `target` look complete
    while it is made of old and new parts; the replaced entries are deleted only once everything new is in place.

    Args:
        staging (`Path`):
            A folder on the same file system as `target`, written whole.
        target (`Path`):
            The folder to update.
        last (`str`, *optional*):
            The entry whose presence marks `target` as complete.
    """
    backup = target / f".facediff-replaced-{uuid.uuid4().hex}"
    backup.mkdir()
    names = sorted((entry.name for entry in staging.iterdir()), key=lambda name: (name == last, name))
    if last is not None and (target / last).exists():
        os.replace(target / last, backup / last)
    for name in names:
        if (target / name).exists():
            os.replace(target / name, backup / name)
        os.replace(staging / name, target / name)
    shutil.rmtree(backup)


def atomic_copy(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """
    Put a copy of the file `source` at `destination`, atomically (`atomic_write`): a hard link where the file system
    allows, which copies no bytes (facediff replaces its files and never changes one in place, so neither name sees
    a later write to the other), else a copy.

    Args:
        source (`str` or `os.PathLike`):
            The file to copy.
        destination (`str` or `os.PathLike`):
            Where the copy goes; replaced if it exists.
    """
    with atomic_write(destination) as partial:
        partial.unlink(missing_ok=True)  # left by a process killed here: os.link does not overwrite
        try:
            os.link(source, partial)
        except OSError:  # another file system, or one without hard links
            shutil.copyfile(source, partial)
