"""One device id rule wherever an id enters: enrollment, relay enrollment, cohort members, and
every path that names a device refuse an id outside the pattern with 422 naming the field."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import quote

import pytest

from tests.server.conftest import CAPS, Fleet

BAD_IDS = [
    ("path-traversal", "../../etc/passwd"),
    ("slash", "a/b"),
    ("empty", ""),
    ("space", "a b"),
    ("leading-dash", "-a"),
    ("leading-dot", ".a"),
    ("too-long", "a" * 129),
    ("newline", "a\nb"),
    ("non-ascii", "pho\u00f1e"),
]
#: Ids that still reach the route when put in a URL path (no slash, not empty, no dot segment).
PATH_BAD_IDS = [(n, i) for n, i in BAD_IDS if "/" not in i and i not in ("",)]


def _enroll_body(fleet: Fleet, device_id: str) -> dict[str, Any]:
    token = fleet.client.post(
        "/v1/enrollment-tokens", json={}, headers=fleet.auth(fleet.token("operator"))
    ).json()["token"]
    return {"enroll_token": token, "device_id": device_id, "capabilities": CAPS["phone-android"]}


def _refused(response: Any, where: list[str]) -> None:
    assert response.status_code == 422, response.text
    locs = [e["loc"] for e in response.json()["detail"]]
    assert where in locs, locs


@pytest.mark.parametrize("bad_id", [i for _, i in BAD_IDS], ids=[n for n, _ in BAD_IDS])
def test_enrollment_refuses_an_id_outside_the_rule(fleet: Fleet, bad_id: str) -> None:
    r = fleet.client.post("/v1/devices/enroll", json=_enroll_body(fleet, bad_id))
    _refused(r, ["body", "device_id"])
    phone = fleet.enroll("phone-1")
    r = fleet.client.post(
        "/v1/devices/phone-1/relay-enroll",
        json=_enroll_body(fleet, bad_id),
        headers=fleet.auth(phone),
    )
    _refused(r, ["body", "device_id"])
    r = fleet.client.post(
        "/v1/cohorts",
        json={"name": "c", "members": [bad_id]},
        headers=fleet.auth(fleet.token("operator")),
    )
    _refused(r, ["body", "members", 0])


@pytest.mark.parametrize("bad_id", [i for _, i in PATH_BAD_IDS], ids=[n for n, _ in PATH_BAD_IDS])
def test_every_path_naming_a_device_refuses_an_id_outside_the_rule(
    fleet: Fleet, bad_id: str
) -> None:
    phone = fleet.enroll("phone-1")
    op = fleet.auth(fleet.token("operator"))
    device = fleet.auth(phone)
    check_in = {"device_id": "phone-1", "nonce": uuid.uuid4().hex, "firmware_version": "14.0.0"}
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/v1/devices/{}/check-in", {"json": check_in, "headers": device}),
        ("POST", "/v1/devices/{}/telemetry", {"content": b"{}", "headers": device}),
        ("POST", "/v1/devices/{}/relay-enroll", {"json": {}, "headers": device}),
        ("DELETE", "/v1/devices/{}/pairing", {"headers": op}),
        ("GET", "/v1/devices/{}", {"headers": op}),
        ("POST", "/v1/devices/{}/revoke", {"headers": op}),
        ("PUT", "/v1/devices/{}/pins/m", {"json": {"version": None}, "headers": op}),
    ]
    for method, path, kwargs in calls:
        r = fleet.client.request(method, path.format(quote(bad_id, safe="")), **kwargs)
        name = "relay_id" if "relay-enroll" in path else "device_id"
        _refused(r, ["path", name])


def test_a_good_id_at_the_limits_enrolls_and_checks_in(fleet: Fleet) -> None:
    for device_id in ("a", "A" + "b" * 127, "ring-3.1_x:7"):
        credential = fleet.enroll(device_id)
        assert fleet.check_in(device_id, credential).status_code == 200
