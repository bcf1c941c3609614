"""Atomic file writes: write beside the target, fsync, then rename over it.

A reader (or a resumed run) sees either the old file or the new one, never a half-written one,
even if the process is killed in the middle of a write. The file gets the permissions an ordinary
``open()`` would give it (0644 under the usual umask 022), not the 0600 of a temporary file, so a
service running as another user, or a stock TF Serving reading a mounted repository, can read it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    # The only way to read the umask is to set it; done once, at import, before any thread writes.
    current = os.umask(0o022)
    os.umask(current)
    return current


_UMASK = _umask()
FILE_MODE = 0o666 & ~_UMASK
DIRECTORY_MODE = 0o777 & ~_UMASK


def make_readable(root: str | os.PathLike) -> None:
    """Give a tree written through temporary files the permissions of ordinary files and folders."""
    top = Path(root)
    os.chmod(top, DIRECTORY_MODE if top.is_dir() else FILE_MODE)
    for folder, directories, files in os.walk(top):
        for name in directories:
            os.chmod(os.path.join(folder, name), DIRECTORY_MODE)
        for name in files:
            os.chmod(os.path.join(folder, name), FILE_MODE)


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        handle = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed to ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent
    )
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        with open(temporary_path, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(temporary_path, FILE_MODE)
        os.replace(temporary_path, target)
        _fsync_directory(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=False) + "\n")


def atomic_save(path: str | os.PathLike, save: Callable[[Path], None]) -> None:
    """Atomically write a file that a library saves by path (``model.save``, ``fig.savefig``)."""
    with atomic_path(path) as temporary:
        save(temporary)
