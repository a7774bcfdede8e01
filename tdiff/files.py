"""Writing files so that a reader never sees half of one: the one atomic-write helper of tdiff.

`atomic_write(path, write)` lets `write` fill a temporary file in the same folder (same file system,
so the final rename is atomic), flushes it to the disk (fsync), renames it over `path` and, on any
failure (a full disk, a permission error, an exception in `write`), removes it and re-raises: the
previous `path`, if any, is untouched. `atomic_directory(path)` does the same for a folder of files
(a checkpoint): it is filled under a temporary name and renamed into place when complete.

Files get the mode an ordinary `open` would give them (0666 less the umask), so a shared project
folder's group can read checkpoints and samples; `tempfile.mkstemp` would make them 0600.
Temporary names start with "." and end in ".tmp" (`is_temporary`), so a run directory can sweep the
leftovers of a process that was killed mid-write.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


def temporary_name(path: Path) -> Path:
    """A hidden sibling of `path`, unique per writer: `.name.1a2b3c4d.tmp`."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Create or replace `path` with what `write(file)` writes, all or nothing."""
    path = Path(path)
    temp = temporary_name(path)
    descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda file: file.write(text.encode()))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """`with atomic_directory(p) as temp:` fill `temp`; on leaving the block it becomes `p`, all or nothing.

    The files are flushed to the disk before the rename; an existing `p` is replaced (moved aside
    first, removed after), so at every moment either the old or the new folder is complete at `p`.
    On any failure the temporary folder is removed and the exception re-raised."""
    path = Path(path)
    temp = temporary_name(path)
    temp.mkdir(mode=0o777)  # the umask applies
    try:
        yield temp
        for file in temp.iterdir():
            _fsync(file, os.O_RDONLY)
        _fsync(temp, os.O_RDONLY)
        aside = temporary_name(path) if path.exists() else None
        if aside is not None:
            os.replace(path, aside)
        os.replace(temp, path)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        _fsync(path.parent, os.O_RDONLY)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _fsync(path: Path, flags: int) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read a MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
