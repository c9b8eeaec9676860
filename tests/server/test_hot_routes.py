"""Check-in and telemetry upload are dispatched ahead of FastAPI's router
(:mod:`server.hot_routes`): the routes the router declares are the ones served, each request is
counted under its route, and every error keeps the shape the app gives it."""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from server.errors import ApiError
from server.hot_routes import HOT_PATHS, HotRoutes
from server.routes import devices, telemetry
from tests.server.conftest import Fleet


def test_the_hot_paths_are_the_routers_own() -> None:
    declared = {
        route.path: route.endpoint
        for router in (devices.router, telemetry.router)
        for route in router.routes
        if isinstance(route, APIRoute) and "POST" in route.methods
    }
    assert declared[HOT_PATHS[0]] is devices.check_in
    assert declared[HOT_PATHS[1]] is telemetry.upload


def test_the_openapi_document_still_describes_them(fleet: Fleet) -> None:
    paths = fleet.client.get("/openapi.json").json()["paths"]
    for path in HOT_PATHS:
        body = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert "device_id" in body["properties"], path


def _counted(fleet: Fleet) -> dict[tuple[str, str], float]:
    text = fleet.client.get("/metrics").text
    found = re.findall(
        r'^edgefleet_http_requests_total\{route="([^"]+)",status="(\d+)"\} (\S+)$', text, re.M
    )
    return {(route, status): float(n) for route, status, n in found}


def _timed(fleet: Fleet) -> dict[str, float]:
    text = fleet.client.get("/metrics").text
    found = re.findall(
        r'^edgefleet_http_request_seconds_count\{route="([^"]+)"\} (\S+)$', text, re.M
    )
    return {route: float(n) for route, n in found}


def test_each_hot_request_is_counted_under_its_route(fleet: Fleet) -> None:
    credential = fleet.enroll("phone-1")
    for _ in range(3):  # the same labels again and again: each request counts
        assert fleet.check_in("phone-1", credential).status_code == 200
    assert fleet.check_in("phone-1", "efd_wrong").status_code == 401
    batch = {"device_id": "phone-1", "boot_epoch": 1, "sequence": 0, "windows": []}
    r = fleet.client.post(
        "/v1/devices/phone-1/telemetry", json=batch, headers=fleet.auth(credential)
    )
    assert r.status_code == 200, r.text
    counted = _counted(fleet)
    assert counted[(HOT_PATHS[0], "200")] == 3
    assert counted[(HOT_PATHS[0], "401")] == 1
    assert counted[(HOT_PATHS[1], "200")] == 1
    assert not any(route == "unmatched" for route, _ in counted)
    timed = _timed(fleet)
    assert timed[HOT_PATHS[0]] == 4
    assert timed[HOT_PATHS[1]] == 1


def test_errors_on_the_hot_paths_keep_the_apps_shapes(fleet: Fleet) -> None:
    credential = fleet.enroll("phone-1")
    auth = fleet.auth(credential)
    # ApiError, by the app's handler: {"detail": reason}.
    r = fleet.check_in("phone-1", "efd_wrong")
    assert r.status_code == 401
    assert r.json() == {"detail": "a valid device credential is required"}
    body = {"device_id": "phone-2", "nonce": "ab" * 16, "firmware_version": "14.0.0"}
    r = fleet.client.post("/v1/devices/phone-1/check-in", json=body, headers=auth)
    assert r.status_code == 400
    assert r.json() == {"detail": "check-in body is for phone-2, URL for phone-1"}
    # RequestValidationError, by FastAPI's handler: a list naming where.
    r = fleet.client.post("/v1/devices/phone-1/check-in", content=b"{not json", headers=auth)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body"]
    # A telemetry refusal, as the route words it.
    r = fleet.client.post(
        "/v1/devices/phone-1/telemetry", content=json.dumps({"device_id": "phone-1"}), headers=auth
    )
    assert r.status_code == 422
    assert "boot_epoch" in r.json()["detail"]


def test_what_the_hot_paths_do_not_take_goes_to_the_router(fleet: Fleet) -> None:
    credential = fleet.enroll("phone-1")
    # Another method: the router's 405, naming the one it serves.
    r = fleet.client.get("/v1/devices/phone-1/check-in", headers=fleet.auth(credential))
    assert r.status_code == 405
    assert r.headers["allow"] == "POST"
    # An id outside the rule (here with a newline, which `$` alone would let through): the
    # router's 422 naming the path parameter.
    for bad in ("phone-1%0A", "-phone", "a" * 129):
        r = fleet.client.post(
            f"/v1/devices/{bad}/check-in", json={}, headers=fleet.auth(credential)
        )
        assert r.status_code == 422, bad
        assert r.json()["detail"][0]["loc"] == ["path", "device_id"], bad
    # A trailing slash: the router's redirect to the path without it.
    r = fleet.client.post(
        "/v1/devices/phone-1/check-in/",
        json={},
        headers=fleet.auth(credential),
        follow_redirects=False,
    )
    assert r.status_code == 307
    assert r.headers["location"].endswith("/v1/devices/phone-1/check-in")


def test_a_hot_request_never_reaches_the_router(fleet: Fleet) -> None:
    """The middleware alone, in front of an app that fails any request it gets: a hot request is
    answered by the endpoint, an error by the app's handler, anything else goes on."""
    passed_on: list[str] = []

    async def router(scope: Any, receive: Any, send: Any) -> None:
        passed_on.append(f"{scope['method']} {scope['path']}")
        await Response(status_code=418)(scope, receive, send)

    async def check_in(device_id: str, request: Request) -> Response:
        if device_id == "refused":
            raise ApiError(403, "refused here")
        return Response(await request.body(), media_type="application/json")

    async def upload(device_id: str, request: Request) -> Response:
        return Response(f"upload {device_id}")

    app = HotRoutes(router, fastapi_app=fleet.client.app, check_in=check_in, upload=upload)
    client = TestClient(app)  # no lifespan: the stand-in router answers only requests
    assert client.post("/v1/devices/d-1/check-in", content=b'{"a":1}').json() == {"a": 1}
    assert client.post("/v1/devices/d-1/telemetry").text == "upload d-1"
    r = client.post("/v1/devices/refused/check-in")
    assert (r.status_code, r.json()) == (403, {"detail": "refused here"})
    assert passed_on == []
    for method, path in (
        ("GET", "/v1/devices/d-1/check-in"),
        ("POST", "/v1/devices/-d/check-in"),
        ("POST", "/v1/devices/d-1/check-in/"),
        ("POST", "/v1/devices/d-1/other"),
    ):
        assert client.request(method, path).status_code == 418
    assert len(passed_on) == 4


def test_a_405_names_the_methods_its_path_is_declared_with(fleet: Fleet) -> None:
    # /v1/devices/enroll is declared for POST; GET /v1/devices/{device_id} matches it too.
    r = fleet.client.request("OPTIONS", "/v1/devices/enroll")
    assert (r.status_code, r.headers["allow"]) == (405, "POST")
    r = fleet.client.delete("/v1/devices/phone-1/pins/m", headers=fleet.auth(fleet.admin))
    assert (r.status_code, r.headers["allow"]) == (405, "PUT")
