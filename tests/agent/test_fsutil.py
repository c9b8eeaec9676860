"""The one atomic-write helper: old or new content, never a mix, and nothing left behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from device_agent import fsutil


def test_the_file_is_replaced_private_and_its_rename_made_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "trust.json"
    target.write_bytes(b"old")
    synced: list[tuple[Path, bytes]] = []
    real = fsutil.fsync_dir

    def spy(directory: Path) -> None:
        # Called after the rename: the new content is already in place.
        synced.append((directory, target.read_bytes()))
        real(directory)

    monkeypatch.setattr(fsutil, "fsync_dir", spy)
    fsutil.write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert synced == [(tmp_path, b"new")]
    assert os.listdir(tmp_path) == ["trust.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "slots.json"
    target.write_bytes(b"old")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        fsutil.write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["slots.json"]
