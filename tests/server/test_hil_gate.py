"""The release gate: a server that requires HIL reports releases a version for a target only when
its bundle carries a passing rig report signed by the root's ``hil`` role."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from firmware_bundles import SigningKey
from firmware_bundles.rig_report import HilBundleRef, HilCheck, HilReport, HilRun
from firmware_bundles.signing import Envelope
from tests.cases import named_cases
from tests.server.conftest import Fleet


def report(
    published: dict[str, Any],
    key: SigningKey,
    *,
    passed: bool = True,
    hardware_id: str = "phone-android",
    bundle_sha256: str | None = None,
) -> bytes:
    """A rig report with one run of the published bundle, signed by ``key``."""
    ref = HilBundleRef(
        name=published["model"],
        version=published["version"],
        release_counter=1,
        bundle_sha256=bundle_sha256 or published["sha256"],
        bytes=published["length"],
        targets=[published["target_id"]],
    )
    status = "pass" if passed else "fail"
    run = HilRun(
        spec=f"emulated:{hardware_id}",
        hardware_id=hardware_id,
        bundle=ref,
        checks=[HilCheck(name="parity", status=status, figure=0.0 if passed else 0.3)],
        passed=passed,
    )
    now = datetime.now(UTC)
    doc = HilReport(
        started_at=now - timedelta(minutes=1),
        finished_at=now,
        bundles=[ref],
        runs=[run],
        passed=passed,
    )
    envelope = Envelope(signed=doc.to_dict())
    envelope.sign(key)
    return envelope.to_bytes()


def attach(fleet: Fleet, bundle_sha256: str, data: bytes) -> Any:
    return fleet.client.post(
        f"/v1/bundles/{bundle_sha256}/hil-report",
        content=data,
        headers=fleet.auth(fleet.token("publisher")),
    )


def release(fleet: Fleet) -> Any:
    return fleet.client.post(
        "/v1/models/wrist-activity/versions/1.0.0/release",
        json={"target": None},
        headers=fleet.auth(fleet.token("operator")),
    )


@pytest.fixture()
def gated(fleet: Fleet) -> Fleet:
    fleet.state.settings.require_hil_report = True
    return fleet


def test_without_the_gate_no_report_is_needed(fleet: Fleet) -> None:
    fleet.publish(fleet.bundle())
    assert release(fleet).status_code == 200


def test_the_gate_holds_a_bundle_without_a_report(gated: Fleet) -> None:
    gated.publish(gated.bundle())
    r = release(gated)
    assert r.status_code == 409
    assert "phone-android: no HIL report attached" in r.json()["detail"]


def test_a_passing_report_opens_the_gate(gated: Fleet) -> None:
    published = gated.publish(gated.bundle())
    r = attach(gated, published["sha256"], report(published, gated.hil_key))
    assert r.status_code == 200, r.text
    assert r.json() == {
        "sha256": published["sha256"],
        "target_id": "phone-android",
        "runs": 1,
        "passed": True,
    }
    assert release(gated).status_code == 200
    credential = gated.enroll("phone-1")
    bundles = gated.check_in("phone-1", credential).json()["signed"]["bundles"]
    assert [b["bundle_sha256"] for b in bundles] == [published["sha256"]]


def test_a_failing_report_is_kept_but_holds_the_release(gated: Fleet) -> None:
    published = gated.publish(gated.bundle())
    r = attach(gated, published["sha256"], report(published, gated.hil_key, passed=False))
    assert r.status_code == 200 and r.json()["passed"] is False
    r = release(gated)
    assert r.status_code == 409
    assert "its HIL report does not pass on this target" in r.json()["detail"]


BAD_REPORTS = [
    ("signed-by-release-key", {"signer": "release"}, "HIL report refused", "role hil"),
    ("other-bundle", {"bundle_sha256": "ab" * 32}, "no run of bundle", "phone-android device"),
    ("other-target", {"hardware_id": "ring-gen3"}, "no run of bundle", "phone-android device"),
    ("not-a-report", {"raw": b'{"hello": 1}'}, "HIL report refused", "hil report"),
]


@named_cases(("change", "first", "second"), BAD_REPORTS)
def test_bad_reports_are_refused_with_their_reason(
    gated: Fleet, change: dict[str, Any], first: str, second: str
) -> None:
    published = gated.publish(gated.bundle())
    if "raw" in change:
        data = change["raw"]
    else:
        key = gated.release_key if change.get("signer") == "release" else gated.hil_key
        kwargs = {k: v for k, v in change.items() if k != "signer"}
        data = report(published, key, **kwargs)
    r = attach(gated, published["sha256"], data)
    assert r.status_code == 400
    assert first in r.json()["detail"] and second in r.json()["detail"]
    assert release(gated).status_code == 409


def test_attaching_needs_the_publisher_role_and_a_known_bundle(gated: Fleet) -> None:
    published = gated.publish(gated.bundle())
    data = report(published, gated.hil_key)
    r = gated.client.post(
        f"/v1/bundles/{published['sha256']}/hil-report",
        content=data,
        headers=gated.auth(gated.token("viewer")),
    )
    assert r.status_code == 403
    r = attach(gated, "cd" * 32, data)
    assert r.status_code == 404
