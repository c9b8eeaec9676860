"""The fleet API on SQLite and PostgreSQL: roles, device isolation, publishing, assignments,
downloads, pairing and relays."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime

import httpx
import pytest

from firmware_bundles import SigningKey
from firmware_bundles.messages import verify_assignments
from firmware_bundles.root import Root
from server.db import check_schema, make_engine
from server.errors import SchemaBehindError
from tests.cases import named_cases
from tests.server.conftest import CAPS, Fleet

ROLE_DENIALS = [
    ("viewer", "POST", "/v1/bundles", "publish"),
    ("viewer", "POST", "/v1/models/m/versions/1.0.0/release", "operate"),
    ("publisher", "POST", "/v1/models/m/versions/1.0.0/release", "operate"),
    ("publisher", "POST", "/v1/enrollment-tokens", "operate"),
    ("operator", "POST", "/v1/tokens", "admin"),
    ("operator", "POST", "/v1/bundles", "publish"),
    ("viewer", "POST", "/v1/bundles/" + "a" * 64 + "/reference", "publish"),
    ("viewer", "POST", "/v1/cohorts", "operate"),
    ("viewer", "GET", "/v1/tokens", "admin"),
]


@pytest.mark.parametrize(
    ("role", "method", "path", "needs"),
    ROLE_DENIALS,
    ids=[f"{r[0]}-{r[3]}-{r[2]}" for r in ROLE_DENIALS],
)
def test_each_role_is_denied_what_it_may_not_do(
    fleet: Fleet, role: str, method: str, path: str, needs: str
) -> None:
    r = fleet.client.request(method, path, headers=fleet.auth(fleet.token(role)), json={})
    assert r.status_code == 403
    assert f"may not {needs}" in r.json()["detail"]


def test_readers_read_and_strangers_are_401(fleet: Fleet) -> None:
    assert (
        fleet.client.get("/v1/models", headers=fleet.auth(fleet.token("viewer"))).status_code == 200
    )
    assert fleet.client.get("/v1/models").status_code == 401
    assert fleet.client.get("/v1/models", headers=fleet.auth("efa_nope")).status_code == 401
    device = fleet.enroll("phone-1")
    r = fleet.client.get("/v1/models", headers=fleet.auth(device))
    assert r.status_code == 403 and "device phone-1" in r.json()["detail"]


def test_revoked_token_stops_working(fleet: Fleet) -> None:
    viewer = fleet.token("viewer")
    tokens = fleet.client.get("/v1/tokens", headers=fleet.auth(fleet.admin)).json()
    viewer_id = next(t["id"] for t in tokens if t["role"] == "viewer")
    fleet.client.delete(f"/v1/tokens/{viewer_id}", headers=fleet.auth(fleet.admin))
    assert fleet.client.get("/v1/models", headers=fleet.auth(viewer)).status_code == 401


def test_a_device_cannot_touch_another_devices_assignment_or_telemetry(fleet: Fleet) -> None:
    a = fleet.enroll("phone-a")
    fleet.enroll("phone-b")
    r = fleet.client.post(
        "/v1/devices/phone-b/check-in",
        headers=fleet.auth(a),
        json={"device_id": "phone-b", "nonce": uuid.uuid4().hex, "firmware_version": "14.0.0"},
    )
    assert r.status_code == 403
    r = fleet.client.post(
        "/v1/devices/phone-b/telemetry",
        headers=fleet.auth(a),
        content=b'{"device_id":"phone-b","boot_epoch":1,"sequence":0,"windows":[]}',
    )
    assert r.status_code == 403


_CHECK_IN_HEAD = b'{"device_id": "phone-a", "nonce": "%s", "firmware_version": "1"' % (b"0" * 32)


@pytest.mark.parametrize(
    ("body", "loc", "kind"),
    [
        (b"\xff\xfe not utf-8", ["body"], "json_invalid"),
        (b'{"device_id": "phone-a", "nonce": ', ["body"], "json_invalid"),
        (b"[]", ["body"], "model_type"),
        (
            b'{"device_id": "phone-a", "nonce": "0123456789abcdef0123456789abcdef"}',
            ["body", "firmware_version"],
            "missing",
        ),
        (
            _CHECK_IN_HEAD + b', "installed": [{"model": 5}]}',
            ["body", "installed", 0, "model"],
            "string_type",
        ),
        (
            _CHECK_IN_HEAD + b', "extra": 1}',
            ["body", "extra"],
            "extra_forbidden",
        ),
    ],
)
def test_a_bad_check_in_body_is_a_422_naming_where(
    fleet: Fleet, body: bytes, loc: list[object], kind: str
) -> None:
    credential = fleet.enroll("phone-a")
    r = fleet.client.post(
        "/v1/devices/phone-a/check-in",
        content=body,
        headers={**fleet.auth(credential), "Content-Type": "application/json"},
    )
    assert r.status_code == 422, r.text
    [error] = r.json()["detail"]
    assert (error["loc"], error["type"]) == (loc, kind)


BAD_BUNDLES = [
    (
        "unsigned",
        lambda f: f.bundle(keys=[]),
        "signature threshold not met for role release: 0 of 1",
    ),
    ("wrongly-signed", lambda f: f.bundle(keys=[SigningKey.generate()]), "unknown key"),
    (
        "catalogue-violating",
        lambda f: f.bundle(
            target="ring-gen3", op_types=["FULLY_CONNECTED", "TreeEnsembleClassifier"]
        ),
        "ops not allowed: TreeEnsembleClassifier",
    ),
    ("not-a-bundle", lambda f: b"hello", "not a bundle archive"),
]


@named_cases(("make", "reason"), BAD_BUNDLES)
def test_bad_bundles_are_refused_with_their_reason(fleet: Fleet, make, reason: str) -> None:  # type: ignore[no-untyped-def]
    r = fleet.client.post(
        "/v1/bundles", content=make(fleet), headers=fleet.auth(fleet.token("publisher"))
    )
    assert r.status_code == 400
    assert reason in r.json()["detail"]


def test_assignment_is_director_signed_for_the_device_with_its_nonce(fleet: Fleet) -> None:
    published = fleet.publish(fleet.bundle(counter=4))
    fleet.release("wrist-activity", "1.0.0")
    credential = fleet.enroll("phone-1")
    nonce = uuid.uuid4().hex
    r = fleet.check_in("phone-1", credential, nonce=nonce)
    assert r.status_code == 200, r.text
    verified = verify_assignments(
        r.content,
        Root.from_dict(fleet.root.to_dict()),
        device_id="phone-1",
        hardware_id="phone-android",
        nonce=nonce,
        now=datetime.now(UTC),
    )
    (assignment,) = verified.assignments
    assert verified.refused == [] and verified.withheld == {}
    assert assignment.bundle_sha256 == published["sha256"]
    assert assignment.release_counter == 4 and assignment.bundle_length == published["length"]
    device = fleet.client.get("/v1/devices/phone-1", headers=fleet.auth(fleet.token("viewer")))
    assert device.json()["last_nonce"] == nonce and device.json()["last_seen"]


def test_publishing_alone_assigns_nothing(fleet: Fleet) -> None:
    fleet.publish(fleet.bundle())
    credential = fleet.enroll("phone-1")
    assert fleet.check_in("phone-1", credential).json()["signed"]["bundles"] == []


def test_incompatible_devices_get_no_assignment_and_a_reason(fleet: Fleet) -> None:
    fleet.publish(fleet.bundle(target="ring-gen3"))
    fleet.release("wrist-activity", "1.0.0")
    old_ring = fleet.enroll("ring-old", target="ring-gen3", firmware_version="2.5.0")
    r = fleet.check_in("ring-old", old_ring, firmware="2.5.0").json()
    assert r["signed"]["bundles"] == []
    assert "firmware 2.5.0 outside the bundle's range" in r["signed"]["withheld"]["wrist-activity"]
    full_ring = fleet.enroll("ring-full", target="ring-gen3", free_flash_bytes=1000)
    r = fleet.check_in("ring-full", full_ring, firmware="3.1.0").json()
    assert r["signed"]["bundles"] == [] and "free" in r["signed"]["withheld"]["wrist-activity"]
    ok_ring = fleet.enroll("ring-ok", target="ring-gen3")
    ok = fleet.check_in("ring-ok", ok_ring, firmware="3.1.0").json()
    assert len(ok["signed"]["bundles"]) == 1


def test_withdraw_falls_back_and_pin_holds(fleet: Fleet) -> None:
    fleet.publish(fleet.bundle(version="1.0.0", counter=1))
    fleet.publish(fleet.bundle(version="1.1.0", counter=2))
    fleet.release("wrist-activity", "1.0.0")
    fleet.release("wrist-activity", "1.1.0")
    cred = fleet.enroll("phone-1")

    def version() -> str:
        signed = fleet.check_in("phone-1", cred).json()["signed"]
        return str(signed["bundles"][0]["version"])

    assert version() == "1.1.0"
    op = fleet.auth(fleet.token("operator"))
    fleet.client.put(
        "/v1/devices/phone-1/pins/wrist-activity", json={"version": "1.0.0"}, headers=op
    )
    assert version() == "1.0.0"
    fleet.client.put("/v1/devices/phone-1/pins/wrist-activity", json={"version": None}, headers=op)
    fleet.client.post("/v1/models/wrist-activity/versions/1.1.0/withdraw", headers=op)
    assert version() == "1.0.0"


def test_range_download_resumes_at_any_offset(fleet: Fleet) -> None:
    data = fleet.bundle()
    bundle_sha256 = fleet.publish(data)["sha256"]
    cred = fleet.enroll("phone-1")
    whole = fleet.client.get(f"/v1/bundles/{bundle_sha256}", headers=fleet.auth(cred))
    assert whole.status_code == 200 and whole.headers["etag"] == f'"{bundle_sha256}"'
    assert int(whole.headers["content-length"]) == len(data)
    for offset in (1, 511, 512, len(data) // 3, len(data) - 1):
        part = fleet.client.get(
            f"/v1/bundles/{bundle_sha256}",
            headers={**fleet.auth(cred), "Range": f"bytes={offset}-"},
        )
        assert part.status_code == 206
        assert int(part.headers["content-length"]) == len(data) - offset
        assert hashlib.sha256(data[:offset] + part.content).hexdigest() == bundle_sha256
    cached = fleet.client.get(
        f"/v1/bundles/{bundle_sha256}",
        headers={**fleet.auth(cred), "If-None-Match": f'"{bundle_sha256}"'},
    )
    assert cached.status_code == 304


def relay_enroll(fleet: Fleet, relay_id: str, credential: str, device_id: str) -> httpx.Response:
    """The relay (its ``credential``) enrolls a ring-gen3 device with a fresh enrollment token."""
    token = fleet.client.post(
        "/v1/enrollment-tokens", json={}, headers=fleet.auth(fleet.token("operator"))
    ).json()["token"]
    return fleet.client.post(
        f"/v1/devices/{relay_id}/relay-enroll",
        headers=fleet.auth(credential),
        json={"enroll_token": token, "device_id": device_id, "capabilities": CAPS["ring-gen3"]},
    )


def test_relay_phone_serves_its_ring_and_an_unpaired_phone_cannot(fleet: Fleet) -> None:
    fleet.publish(fleet.bundle(target="ring-gen3"))
    fleet.release("wrist-activity", "1.0.0")
    phone = fleet.enroll("phone-1")
    stranger = fleet.enroll("phone-2")
    r = relay_enroll(fleet, "phone-1", phone, "ring-1")
    assert r.status_code == 201 and r.json()["relay_id"] == "phone-1"
    ring_nonce = uuid.uuid4().hex
    body = {"device_id": "ring-1", "nonce": ring_nonce, "firmware_version": "3.1.0"}
    r = fleet.client.post("/v1/devices/ring-1/check-in", json=body, headers=fleet.auth(phone))
    assert r.status_code == 200
    signed = r.json()["signed"]
    assert len(signed["bundles"]) == 1
    assert signed["device_id"] == "ring-1" and signed["hardware_id"] == "ring-gen3"
    assert signed["nonce"] == ring_nonce
    batch = b'{"device_id":"ring-1","boot_epoch":1,"sequence":0,"windows":[]}'

    def status(path: str, credential: str, **body: object) -> int:
        return int(
            fleet.client.post(
                f"/v1/devices/ring-1/{path}", headers=fleet.auth(credential), **body
            ).status_code
        )

    assert status("telemetry", phone, content=batch) == 200
    assert status("check-in", stranger, json=body) == 403
    assert status("telemetry", stranger, content=batch) == 403
    # Unpairing ends it for the phone too.
    assert (
        fleet.client.delete("/v1/devices/ring-1/pairing", headers=fleet.auth(phone)).status_code
        == 200
    )
    assert status("check-in", phone, json=body) == 403


def test_enrollment_token_limits(fleet: Fleet) -> None:
    op = fleet.auth(fleet.token("operator"))
    token = fleet.client.post("/v1/enrollment-tokens", json={"max_uses": 1}, headers=op).json()[
        "token"
    ]
    body = {"enroll_token": token, "device_id": "p1", "capabilities": CAPS["phone-android"]}
    assert fleet.client.post("/v1/devices/enroll", json=body).status_code == 201
    r = fleet.client.post("/v1/devices/enroll", json={**body, "device_id": "p2"})
    assert r.status_code == 401 and "used up" in r.json()["detail"]
    r = fleet.client.post("/v1/devices/enroll", json={**body, "enroll_token": "efe_x"})
    assert r.status_code == 401


def test_revoked_device_is_locked_out(fleet: Fleet) -> None:
    cred = fleet.enroll("phone-1")
    fleet.client.post("/v1/devices/phone-1/revoke", headers=fleet.auth(fleet.token("operator")))
    assert fleet.check_in("phone-1", cred).status_code == 401


def test_cohorts_static_and_by_filter(fleet: Fleet) -> None:
    fleet.enroll("phone-1")
    fleet.enroll("ring-1", target="ring-gen3")
    op = fleet.auth(fleet.token("operator"))
    assert (
        fleet.client.post(
            "/v1/cohorts",
            headers=op,
            json={"name": "rings", "filter": {"generation": "ring-gen3", "firmware_min": "3.0.0"}},
        ).status_code
        == 201
    )
    assert (
        fleet.client.post(
            "/v1/cohorts", headers=op, json={"name": "beta", "members": ["phone-1"]}
        ).status_code
        == 201
    )
    cohorts = {c["name"]: c["devices"] for c in fleet.client.get("/v1/cohorts", headers=op).json()}
    assert cohorts == {"beta": ["phone-1"], "rings": ["ring-1"]}


def test_server_refuses_a_schema_that_is_behind(database_url: str) -> None:
    with pytest.raises(SchemaBehindError, match="edgefleet db upgrade"):
        check_schema(make_engine(database_url))


def test_health_metrics_roots(fleet: Fleet) -> None:
    assert fleet.client.get("/healthz").json() == {"status": "ok"}
    assert fleet.client.get("/readyz").json()["status"] == "ready"
    assert fleet.client.get("/v1/roots/1.json").status_code == 200
    assert fleet.client.get("/v1/roots/2.json").status_code == 404
    assert "edgefleet_http_requests_total" in fleet.client.get("/metrics").text
