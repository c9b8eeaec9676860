"""``edgefleet hil run`` across the three emulated targets, with one fault of each kind.

The rig runs in-process through the CLI (typer's runner): emulated rings on radio-paced Bumble
links, the emulated board on a real pty at 1 Mbaud, sample bundles signed by the test keys.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
import pytest
from typer.testing import CliRunner

from edgefleet.cli import app
from firmware_bundles import SigningKey
from hil.errors import RigError
from hil.report import verify_report
from hil.samples import heldout, sample_bundle
from tests.conftest import Keys

TARGETS = ["ring-gen3", "ring-gen4", "devboard-nrf52840"]
EVERY_CHECK = {
    "bundle-verified",
    "upload",
    "activate",
    "self-test",
    "parity",
    "float-original",
    "accuracy",
    "latency-p95",
    "peak-memory",
    "telemetry",
    "fault:disconnect",
    "fault:bitflip",
    "fault:power-cut",
}


@dataclass
class Lab:
    root: Path
    director: Path
    hil: Path
    data: Path
    bundles: dict[str, Path]
    keys: Keys


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Lab:
    base = tmp_path_factory.mktemp("lab")
    _, envelope = keys.make_root()
    (base / "root.json").write_bytes(envelope.to_bytes())
    (base / "director.pem").write_bytes(keys.director[0].to_pem())
    (base / "hil.pem").write_bytes(keys.hil[0].to_pem())
    x, y = heldout(40)
    np.savez(base / "heldout.npz", X=x, y=y)
    bundles = {}
    for target in TARGETS:
        bundles[target] = base / f"{target}.efb"
        bundles[target].write_bytes(sample_bundle(keys.release, [target]))
    return Lab(
        base / "root.json",
        base / "director.pem",
        base / "hil.pem",
        base / "heldout.npz",
        bundles,
        keys,
    )


def _hil_run(lab: Lab, report: Path) -> list[str]:
    """`hil run` on the lab's held-out data, root and keys, reporting to ``report``."""
    keys = ["--root", str(lab.root), "--director-key", str(lab.director), "--hil-key", str(lab.hil)]
    return ["hil", "run", "--data", str(lab.data), "--report", str(report), *keys]


def _run(lab: Lab, report: Path, *extra: str, devices: list[str] | None = None) -> tuple[int, str]:
    args = [
        *_hil_run(lab, report),
        "--max-samples",
        "20",
        "--baud",
        "1000000",
        "--seed",
        "11",
        "--timeout-s",
        "2",
        "--json",
    ]
    for bundle in lab.bundles.values():
        args += ["--bundle", str(bundle)]
    for device in devices or [f"emulated:{t}" for t in TARGETS]:
        args += ["--device", device]
    result = CliRunner().invoke(app, [*args, *extra])
    return result.exit_code, result.stdout if result.exit_code != 2 else result.output


def test_three_targets_with_every_fault_pass_and_the_report_is_signed(
    lab: Lab, tmp_path: Path
) -> None:
    code, output = _run(lab, tmp_path, "--faults", "disconnect,bitflip,power-cut")
    body = json.loads(output)
    assert code == 0, json.dumps([r["checks"] for r in body["runs"]], indent=1)
    assert body["passed"] and body["faults"] == ["disconnect", "bitflip", "power-cut"]
    assert sorted(r["hardware_id"] for r in body["runs"]) == sorted(TARGETS)
    for run in body["runs"]:
        checks = {c["name"]: c for c in run["checks"]}
        assert set(checks) == EVERY_CHECK
        assert all(c["status"] == "pass" and c["figure"] is not None for c in checks.values())
        assert checks["fault:disconnect"]["figure"] > 0
        # 20 held-out rows and the 3 self-test inputs run against the float original.
        assert checks["telemetry"]["figure"] == 23
        assert checks["parity"]["figure"] <= 1e-5
        # Rings and the nRF board run the .tflite in TFLM: exact against host TFLM, and the
        # arena is the one TFLM measured, named with its runtime and version.
        assert checks["parity"]["figure"] == 0.0 and "TFLM" in checks["parity"]["detail"]
        assert "runtime TFLM 0.dev" in checks["peak-memory"]["detail"]
        # And against the float original's outputs the bundle carries, within its tolerance.
        float_check = checks["float-original"]
        assert float_check["limit"] == "<= 1e-05" and 0 < float_check["figure"] <= 1e-5
        assert "3 self-test inputs" in float_check["detail"]
    signed = verify_report((tmp_path / "report.json").read_bytes(), lab.keys.make_root()[0])
    assert signed.to_dict()["runs"] == body["runs"]
    for target, path in lab.bundles.items():
        bundle_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        assert signed.passed_for(bundle_sha256, target), "the release gate's question"
        assert not signed.passed_for(bundle_sha256, "phone-android")
    suites = ET.parse(tmp_path / "junit.xml").getroot()
    assert len(suites) == 3 and all(s.get("failures") == "0" for s in suites)
    assert "PASSED" in (tmp_path / "summary.md").read_text()
    verified = CliRunner().invoke(
        app, ["hil", "verify-report", str(tmp_path / "report.json"), "--root", str(lab.root)]
    )
    assert verified.exit_code == 0 and "signature ok" in verified.output


def test_a_failing_check_fails_the_run(lab: Lab, tmp_path: Path) -> None:
    code, output = _run(
        lab,
        tmp_path,
        "--latency-p95-max-ms",
        "0.000001",
        devices=["emulated:devboard-nrf52840"],
    )
    assert code == 1
    body = json.loads(output)
    checks = {c["name"]: c for c in body["runs"][0]["checks"]}
    assert checks["latency-p95"]["status"] == "fail" and checks["parity"]["status"] == "pass"
    assert not body["passed"]
    suite = ET.parse(tmp_path / "junit.xml").getroot()[0]
    assert suite.get("failures") == "1"
    assert suite.find("testcase[@name='latency-p95']/failure") is not None
    assert "FAILED" in (tmp_path / "summary.md").read_text()
    signed = verify_report((tmp_path / "report.json").read_bytes(), lab.keys.make_root()[0])
    bundle_sha256 = hashlib.sha256(lab.bundles["devboard-nrf52840"].read_bytes()).hexdigest()
    assert not signed.passed_for(bundle_sha256, "devboard-nrf52840")
    not_passed = CliRunner().invoke(
        app, ["hil", "verify-report", str(tmp_path / "report.json"), "--root", str(lab.root)]
    )
    assert not_passed.exit_code == 1 and "FAILED" in not_passed.output


def test_a_device_without_a_bundle_for_its_target_fails(lab: Lab, tmp_path: Path) -> None:
    args = [
        *_hil_run(lab, tmp_path),
        "--bundle",
        str(lab.bundles["ring-gen4"]),
        "--device",
        "emulated:devboard-nrf52840",
        "--baud",
        "1000000",
        "--json",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    check = json.loads(result.stdout)["runs"][0]["checks"][0]
    assert check["name"] == "bundle-for-target" and check["status"] == "fail"
    assert check["detail"] == "no bundle built for devboard-nrf52840 (ring-gen4)"


def test_tampered_report_does_not_verify(lab: Lab, tmp_path: Path) -> None:
    _run(lab, tmp_path, devices=["emulated:devboard-nrf52840"])
    data = (tmp_path / "report.json").read_bytes()
    tampered = data.replace(b'"passed":true', b'"passed":false', 1)
    assert tampered != data
    with pytest.raises(RigError, match="does not verify"):
        verify_report(tampered, lab.keys.make_root()[0])
    (tmp_path / "tampered.json").write_bytes(tampered)
    result = CliRunner().invoke(
        app, ["hil", "verify-report", str(tmp_path / "tampered.json"), "--root", str(lab.root)]
    )
    assert result.exit_code == 1 and "does not verify" in result.output


BAD_RUNS = [
    ("unknown-fault", ["--faults", "meteor"], "unknown fault 'meteor'"),
    ("data-without-X", ["--data", "{no_x}"], "no array named X"),
    ("missing-data", ["--data", "{missing}"], "cannot read held-out data"),
]


@pytest.mark.parametrize(
    ("extra", "message"), [b[1:] for b in BAD_RUNS], ids=[b[0] for b in BAD_RUNS]
)
def test_bad_rig_arguments_exit_2_naming_the_problem(
    lab: Lab, tmp_path: Path, extra: list[str], message: str
) -> None:
    np.savez(tmp_path / "no_x.npz", features=np.zeros((3, 4)))
    values = {"no_x": str(tmp_path / "no_x.npz"), "missing": str(tmp_path / "nope.npz")}
    extra = [e.format(**values) for e in extra]
    code, output = _run(lab, tmp_path / "report", *extra, devices=["emulated:devboard-nrf52840"])
    assert code == 2 and message in output


def test_a_report_key_outside_the_hil_role_is_refused(lab: Lab, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger.pem"
    stranger.write_bytes(SigningKey.generate().to_pem())
    code, output = _run(lab, tmp_path / "report", "--hil-key", str(stranger))
    assert code == 2 and "is not a key of the root's hil role" in output


def test_unknown_device_kind_is_reported_as_a_failed_connect(lab: Lab, tmp_path: Path) -> None:
    code, output = _run(lab, tmp_path, devices=["usb:0"])
    assert code == 1
    check = json.loads(output)["runs"][0]["checks"][0]
    assert check["name"] == "connect" and "unknown kind 'usb'" in check["detail"]
