"""Crash-safe file writes for the agent's state dir: the one atomic-write helper, and dir fsync.

Every file the agent or the relay replaces whole (slot records, trust counters, the rotated root,
credentials, status, conditions) goes through :func:`write_atomic`, so after a crash or power cut
it holds either the old bytes or the new ones, never a mix.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: temp file in the same dir, fsync, ``os.replace``, dir fsync.

    Args:
        path: The file to replace (its directory must exist).
        data: The new content.
        mode: Permission bits of the new file (private by default).

    Raises:
        OSError: If the directory is not writable or the disk is full; ``path`` is unchanged and
            no temp file is left behind.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # Without it the rename may be lost on power cut, leaving the old file after "success".
    fsync_dir(path.parent)
