"""Writing files so that a reader never sees half of one: the one atomic-write helper of tdiff.

`atomic_write(path, write)` lets `write` fill a temporary file in the same folder (same file system,
so the final rename is atomic), flushes it to the disk (fsync), renames it over `path` and, on any
failure (a full disk, a signal-free exception, a permission error), removes it and re-raises: the
previous `path`, if any, is untouched. The file gets the mode an ordinary `open` would give it
(0666 less the umask), so a shared project folder's group can read checkpoints and samples;
`tempfile.mkstemp` would make it 0600.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Create or replace `path` with what `write(file)` writes, all or nothing."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")  # hidden, unique per writer
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
