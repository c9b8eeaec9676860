"""Hostile bundle files cost bounded memory in `edgefleet bundle verify` and `inspect`.

Each file is built sparse (a 300 MB file costs nothing on disk) with tar headers that lie in a
different way; the real CLI runs in a subprocess and its peak RSS is compared with a run on a
valid small bundle. Whatever a header or the manifest claims, memory grows by under 64 MB and the
bundle is refused with a message naming the problem.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from firmware_bundles import build
from tests.conftest import MODEL_BYTES, Keys, manifest_draft

REPO = Path(__file__).resolve().parent.parent
MB = 1_000_000
#: Allowed growth of peak RSS over the valid-bundle baseline.
MAX_GROWTH_BYTES = 64 * 1024 * 1024


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    # GNU format stores sizes over 8 GiB in base-256, which tarfile (and so an attacker) can do.
    return info.tobuf(format=tarfile.GNU_FORMAT)


def _write(path: Path, parts: list[bytes | int]) -> Path:
    """Write headers and data; an int is a run of that many zero bytes, left as a sparse hole."""
    with path.open("wb") as fh:
        for part in parts:
            if isinstance(part, int):
                fh.seek(part, os.SEEK_CUR)
            else:
                fh.write(part)
        fh.truncate(fh.tell())
    return path


def _pad(size: int) -> int:
    return -size % 512


def _manifest_of(bundle: bytes) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(bundle)) as tar:
        member = tar.extractfile("manifest.json")
        assert member is not None
        return member.read()


def _manifest_then_model(path: Path, manifest: bytes, model_size: int, hole: int) -> Path:
    """The signed manifest member, then a ``model.onnx`` header claiming ``model_size`` bytes,
    then ``hole`` zero bytes (what the file really holds after that header)."""
    head = [_header("manifest.json", len(manifest)), manifest, _pad(len(manifest))]
    return _write(path, [*head, _header("model.onnx", model_size), hole])


def _huge_member(tmp: Path, manifest: bytes) -> Path:
    """A 300 MB model member (over the 256 MiB member cap)."""
    size = 300 * MB
    return _manifest_then_model(tmp / "huge-member.efb", manifest, size, size + _pad(size) + 1024)


def _lying_header(tmp: Path, manifest: bytes) -> Path:
    """A header claiming a 1 TiB member in a 300 MB file."""
    return _manifest_then_model(tmp / "lying-header.efb", manifest, 1 << 40, 300 * MB)


def _longer_than_manifest(tmp: Path, manifest: bytes) -> Path:
    """A 200 MB model member (under the cap) where the manifest says 10,240 bytes."""
    size = 200 * MB
    return _manifest_then_model(tmp / "longer-than-manifest.efb", manifest, size, size + 1024)


def _huge_manifest(tmp: Path, manifest: bytes) -> Path:
    """A 300 MB manifest.json (its cap is 4 MiB)."""
    size = 300 * MB
    return _write(
        tmp / "huge-manifest.efb",
        [_header("manifest.json", size), manifest, size - len(manifest) + 1024],
    )


def _wrong_hash_at_length(tmp: Path, keys: Keys) -> Path:
    """A 200 MB model the manifest lists at exactly that length, but whose bytes differ.

    Nothing is over a cap or disagrees on length, so the member must be hashed, in chunks.
    """
    size = 200 * MB
    draft = manifest_draft()
    signed = build(draft, {"model.onnx": b"\x01" * size}, keys.release)
    return _manifest_then_model(tmp / "wrong-hash.efb", _manifest_of(signed), size, size + 1024)


#: Runs the real CLI and, at exit, writes its own peak RSS (VmHWM of this process image; the
#: rusage of a child also counts the parent's pages from before its exec) to the file named in
#: argv[1].
_MEASURED = """
import atexit, re, runpy, sys
out = sys.argv.pop(1)
def _peak():
    status = open("/proc/self/status").read()
    kib = int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1))
    open(out, "w").write(str(kib * 1024))
atexit.register(_peak)
sys.argv[0] = "edgefleet"
runpy.run_module("edgefleet", run_name="__main__", alter_sys=True)
"""


def _run_cli(args: list[str], tmp: Path) -> tuple[int, str, int]:
    """(exit code, stderr + stdout, peak RSS in bytes) of ``edgefleet ARGS`` in a subprocess."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    peak_file = tmp / "peak"
    result = subprocess.run(
        [sys.executable, "-c", _MEASURED, str(peak_file), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    output = (result.stdout + result.stderr).decode(errors="replace")
    return result.returncode, output, int(peak_file.read_text())


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("hostile")
    valid = build(manifest_draft(), {"model.onnx": MODEL_BYTES}, keys.release)
    (tmp / "valid.efb").write_bytes(valid)
    (tmp / "root.json").write_bytes(keys.make_root()[1].to_bytes())
    manifest = _manifest_of(valid)
    return {
        "valid": tmp / "valid.efb",
        "root": tmp / "root.json",
        "huge-member": _huge_member(tmp, manifest),
        "lying-header": _lying_header(tmp, manifest),
        "longer-than-manifest": _longer_than_manifest(tmp, manifest),
        "huge-manifest": _huge_manifest(tmp, manifest),
        "wrong-hash": _wrong_hash_at_length(tmp, keys),
    }


COMMANDS: dict[str, Callable[[Path, Path], list[str]]] = {
    "verify": lambda bundle, root: ["bundle", "verify", str(bundle), "--root", str(root)],
    "inspect": lambda bundle, root: ["bundle", "inspect", str(bundle)],
}

HOSTILE = [
    ("huge-member", "over the cap"),
    ("lying-header", "over the cap"),
    ("longer-than-manifest", "manifest says 10240"),
    ("huge-manifest", "over the cap"),
    ("wrong-hash", "SHA-256"),
]


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize(("name", "reason"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_bundle_refused_in_bounded_memory(
    files: dict[str, Path], command: str, name: str, reason: str, tmp_path: Path
) -> None:
    build_args = COMMANDS[command]
    code, out, baseline = _run_cli(build_args(files["valid"], files["root"]), tmp_path)
    assert code == 0, out
    code, out, peak = _run_cli(build_args(files[name], files["root"]), tmp_path)
    assert code == 1, out
    assert "Traceback" not in out
    assert reason in out, out
    growth = peak - baseline
    print(f"{command} {name}: peak {peak / MB:.1f} MB, baseline {baseline / MB:.1f} MB")
    assert growth < MAX_GROWTH_BYTES, f"peak RSS grew by {growth / MB:.1f} MB"
