"""The release gate end to end, as a user runs it: a server started to require HIL reports, a
sample bundle through `edgefleet hil run` on an emulated ring, and `edgefleet publish
--hil-report` / `edgefleet release` over real HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware_bundles import Envelope, SigningKey
from tests.procs import ServerProcess


def edgefleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgefleet", *args], capture_output=True, text=True, check=False
    )


@pytest.fixture()
def gated_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServerProcess]:
    monkeypatch.setenv("EDGEFLEET_REQUIRE_HIL_REPORT", "true")
    proc = ServerProcess(data_dir=tmp_path / "data", log_dir=tmp_path)
    try:
        yield proc.start()
    finally:
        proc.stop()


def _ring_sample(keys: Path, tmp_path: Path) -> tuple[Path, Path]:
    """`edgefleet hil samples` for ring-gen3, signed with the server's release key: the samples
    directory (with its held-out data) and the bundle in it."""
    samples = tmp_path / "samples"
    made = edgefleet(
        "hil", "samples", "--key", str(keys / "release.pem"), "--out", str(samples),
        "--hardware-id", "ring-gen3",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    return samples, samples / "sample-ring-gen3.efb"


def test_only_a_bundle_with_a_passing_rig_report_is_released(
    gated_server: ServerProcess, tmp_path: Path
) -> None:
    data, keys = gated_server.data_dir, gated_server.data_dir / "keys"
    server = ["--server", gated_server.url, "--token", gated_server.admin_token]
    samples, bundle = _ring_sample(keys, tmp_path)

    # Published without a report: the gate holds the release and says why.
    published = edgefleet("publish", str(bundle), "--json", *server)
    assert published.returncode == 0, published.stderr
    model, version = (
        json.loads(published.stdout)[0]["model"],
        json.loads(published.stdout)[0]["version"],
    )
    held = edgefleet("release", model, version, *server)
    assert held.returncode != 0
    assert "held by the HIL gate" in held.stdout + held.stderr
    assert "no HIL report attached" in held.stdout + held.stderr

    # The rig runs the bundle on an emulated ring and signs its report with the root's hil key.
    report_dir = tmp_path / "report"
    rig = edgefleet(
        "hil", "run", "--bundle", str(bundle), "--device", "emulated:ring-gen3",
        "--data", str(samples / "heldout.npz"), "--report", str(report_dir),
        "--root", str(data / "root.json"), "--director-key", str(keys / "director.pem"),
        "--hil-key", str(keys / "hil.pem"), "--max-samples", "20",
    )  # fmt: skip
    assert rig.returncode == 0, rig.stdout + rig.stderr

    attached = edgefleet(
        "publish", str(bundle), "--hil-report", str(report_dir / "report.json"), *server
    )
    assert attached.returncode == 0, attached.stderr
    assert "HIL report attached (1 run(s)): passes" in attached.stdout
    released = edgefleet("release", model, version, "--json", *server)
    assert released.returncode == 0, released.stdout + released.stderr
    assert json.loads(released.stdout)["released_for"] == ["ring-gen3"]


def test_a_report_re_signed_by_a_key_outside_the_hil_role_is_refused(
    gated_server: ServerProcess, tmp_path: Path
) -> None:
    keys = gated_server.data_dir / "keys"
    server = ["--server", gated_server.url, "--token", gated_server.admin_token]
    samples, bundle = _ring_sample(keys, tmp_path)
    report_dir = tmp_path / "report"
    rig = edgefleet(
        "hil", "run", "--bundle", str(bundle), "--device", "emulated:ring-gen3",
        "--data", str(samples / "heldout.npz"), "--report", str(report_dir),
        "--root", str(gated_server.data_dir / "root.json"),
        "--director-key", str(keys / "director.pem"), "--hil-key", str(keys / "hil.pem"),
        "--max-samples", "5",
    )  # fmt: skip
    assert rig.returncode == 0, rig.stdout + rig.stderr
    # The same passing verdict, signed instead by the release key (in the root, not in hil).
    genuine = Envelope.from_bytes((report_dir / "report.json").read_bytes())
    forged = Envelope(signed=genuine.signed)
    forged.sign(SigningKey.from_pem((keys / "release.pem").read_bytes()))
    forged_path = tmp_path / "forged.json"
    forged_path.write_bytes(forged.to_bytes())
    attached = edgefleet("publish", str(bundle), "--hil-report", str(forged_path), *server)
    assert attached.returncode != 0
    assert "HIL report refused" in attached.stdout + attached.stderr
    assert "role hil" in attached.stdout + attached.stderr
