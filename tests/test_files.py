"""The one atomic-write helper: all or nothing, nothing left behind, the umask's mode (not mkstemp's 0600)."""

from __future__ import annotations

import errno
import os
import stat

import numpy as np
import pytest

from tdiff.files import atomic_write, atomic_write_text
from tdiff.sample import save_npz


@pytest.fixture
def umask():
    def set_umask(mask: int) -> None:
        os.umask(mask)

    previous = os.umask(0o022)
    yield set_umask
    os.umask(previous)


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_files_get_the_mode_an_ordinary_open_would_give(tmp_path, umask, mask):
    umask(mask)
    atomic_write_text(tmp_path / "config.toml", "x = 1\n")
    save_npz(tmp_path / "samples.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    for name in ("config.toml", "samples.npz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "metrics.txt"
    atomic_write_text(path, "finished\n")

    def disk_full(file) -> None:
        file.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, disk_full)
    assert path.read_text() == "finished\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.txt"]


def test_an_interrupted_write_leaves_nothing_either(tmp_path):
    def interrupted(file) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "grid.png", interrupted)
    assert list(tmp_path.iterdir()) == []
