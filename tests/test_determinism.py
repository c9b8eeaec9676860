"""Packing is reproducible: same inputs, same bytes, whatever the machine's state."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from firmware_bundles import build
from tests.conftest import MODEL_BYTES, Keys, manifest_draft

REPO = Path(__file__).resolve().parent.parent


def _write_inputs(directory: Path, keys: Keys, mtime: int, order: list[str]) -> None:
    directory.mkdir()
    files = {"model.onnx": MODEL_BYTES, "labels.txt": b"rest\nmove\n", "extra/notes.md": b"# n\n"}
    for name in order:  # creation order drives the directory listing order on most filesystems
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(files[name])
        os.utime(path, (mtime, mtime))
    draft = manifest_draft()
    del draft["created_at"]  # comes from SOURCE_DATE_EPOCH
    (directory / "draft.json").write_text(json.dumps(draft))
    (directory / "key.pem").write_bytes(keys.release[0].to_pem())


def _pack_in_subprocess(directory: Path, env_extra: dict[str, str], umask: int) -> bytes:
    out = directory / "bundle.efb"
    file_args = []
    for p in sorted(os.listdir(directory), reverse=umask % 2 == 1):
        if p in ("model.onnx", "labels.txt"):
            file_args += ["--file", str(directory / p)]
    file_args += ["--file", f"extra/notes.md={directory / 'extra' / 'notes.md'}"]
    env = {**os.environ, **env_extra}
    cmd = [
        sys.executable,
        "-m",
        "edgefleet",
        "bundle",
        "pack",
        "--manifest",
        str(directory / "draft.json"),
        *file_args,
        "--key",
        str(directory / "key.pem"),
        "--out",
        str(out),
    ]
    subprocess.run(
        cmd, env=env, check=True, capture_output=True, cwd=REPO, preexec_fn=lambda: os.umask(umask)
    )
    return out.read_bytes()


def test_same_inputs_same_bytes_in_process(keys: Keys) -> None:
    files = {"model.onnx": MODEL_BYTES, "b.txt": b"b", "a.txt": b"a"}
    one = build(manifest_draft(), files, keys.release)
    two = build(manifest_draft(), dict(reversed(list(files.items()))), list(reversed(keys.release)))
    assert hashlib.sha256(one).hexdigest() == hashlib.sha256(two).hexdigest()


def test_same_bytes_across_tz_locale_umask_hashseed_mtimes_and_order(
    tmp_path: Path, keys: Keys
) -> None:
    a = tmp_path / "a"
    b = tmp_path / "b"
    _write_inputs(a, keys, mtime=1_000_000, order=["model.onnx", "labels.txt", "extra/notes.md"])
    _write_inputs(
        b, keys, mtime=1_700_000_000, order=["extra/notes.md", "labels.txt", "model.onnx"]
    )
    first = _pack_in_subprocess(
        a,
        {"TZ": "UTC", "LC_ALL": "C", "PYTHONHASHSEED": "1", "SOURCE_DATE_EPOCH": "1767225600"},
        umask=0o022,
    )
    second = _pack_in_subprocess(
        b,
        {
            "TZ": "Pacific/Kiritimati",
            "LC_ALL": "C.UTF-8",
            "PYTHONHASHSEED": "4242",
            "SOURCE_DATE_EPOCH": "1767225600",
        },
        umask=0o077,
    )
    assert hashlib.sha256(first).hexdigest() == hashlib.sha256(second).hexdigest()
    # And the build time really came from SOURCE_DATE_EPOCH (2026-01-01T00:00:00Z).
    assert b'"created_at":"2026-01-01T00:00:00Z"' in first


def test_other_build_time_other_bytes(tmp_path: Path, keys: Keys) -> None:
    a = tmp_path / "a"
    _write_inputs(a, keys, mtime=0, order=["model.onnx", "labels.txt", "extra/notes.md"])
    one = _pack_in_subprocess(a, {"SOURCE_DATE_EPOCH": "1767225600"}, umask=0o022)
    two = _pack_in_subprocess(a, {"SOURCE_DATE_EPOCH": "1767225601"}, umask=0o022)
    assert one != two


def test_archive_is_blocks_only_with_no_record_padding(keys: Keys) -> None:
    """Each member costs its 512-byte header and its data rounded up to a block; then 1,024."""
    files = {"model.onnx": MODEL_BYTES, "labels.txt": b"rest\nmove\n"}
    data = build(manifest_draft(), files, keys.release)
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        sizes = [m.size for m in tar.getmembers()]
    assert len(data) == sum(512 + s + -s % 512 for s in sizes) + 1024
    assert build(manifest_draft(), dict(reversed(files.items())), keys.release) == data
