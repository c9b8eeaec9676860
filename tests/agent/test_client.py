"""The agent's one HTTP boundary: each status and transport failure becomes one agent error.

These run over ``httpx.MockTransport``: what is under test is the client's own mapping of a
response (or a raised httpx error) to our errors, which needs no socket; the routes against the
real server are exercised by test_outbox.py, test_runner.py (uvicorn) and tests/link/test_relay.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from device_agent.client import FleetClient
from device_agent.errors import (
    AgentError,
    AuthError,
    InvalidRequest,
    NotFound,
    NotOfferedError,
    ResumeRefused,
    ServerRejected,
    ServerUnreachable,
    StallError,
)
from firmware_bundles.messages import CheckInRequest

SERVER = "https://fleet.example"
Handler = Callable[[httpx.Request], httpx.Response]


def _status(status: int) -> Handler:
    return lambda request: httpx.Response(status, json={"detail": f"why {status}"})


def _raises(exc: type[httpx.TransportError]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc("on purpose", request=request)

    return handler


# (id, server behaviour, error of a plain request, retryable, error of a download, retryable)
TABLE: list[tuple[str, Handler, type[AgentError], bool, type[AgentError], bool]] = [
    ("307", _status(307), ServerRejected, False, ServerRejected, False),
    ("400", _status(400), InvalidRequest, False, InvalidRequest, False),
    ("401", _status(401), AuthError, False, AuthError, False),
    ("403", _status(403), AuthError, False, AuthError, False),
    ("404", _status(404), NotFound, False, NotOfferedError, False),
    ("409", _status(409), ServerRejected, False, ServerRejected, False),
    ("410", _status(410), NotFound, False, NotOfferedError, False),
    ("413", _status(413), InvalidRequest, False, InvalidRequest, False),
    ("416", _status(416), ServerRejected, False, ResumeRefused, True),
    ("422", _status(422), InvalidRequest, False, InvalidRequest, False),
    ("429", _status(429), ServerRejected, True, ServerRejected, True),
    ("500", _status(500), ServerRejected, True, ServerRejected, True),
    ("502", _status(502), ServerUnreachable, True, ServerUnreachable, True),
    ("503", _status(503), ServerUnreachable, True, ServerUnreachable, True),
    (
        "connect-error",
        _raises(httpx.ConnectError),
        ServerUnreachable,
        True,
        ServerUnreachable,
        True,
    ),
    (
        "connect-timeout",
        _raises(httpx.ConnectTimeout),
        ServerUnreachable,
        True,
        ServerUnreachable,
        True,
    ),
    ("read-timeout", _raises(httpx.ReadTimeout), ServerUnreachable, True, StallError, True),
    (
        "broken-body",
        _raises(httpx.RemoteProtocolError),
        ServerUnreachable,
        True,
        ServerUnreachable,
        True,
    ),
]
IDS = [row[0] for row in TABLE]


def _client(handler: Handler, tmp_path: Path) -> FleetClient:
    return FleetClient(httpx.Client(transport=httpx.MockTransport(handler)), SERVER, tmp_path, 5)


def _check_in_request() -> CheckInRequest:
    return CheckInRequest.from_dict(
        {"device_id": "phone-1", "nonce": "ab" * 16, "firmware_version": "10.0.0"}
    )


def _assert_mapped(exc: AgentError, error: type[AgentError], retryable: bool) -> None:
    assert type(exc) is error, f"{type(exc).__name__} instead of {error.__name__}"
    assert exc.retryable is retryable
    if isinstance(exc, ServerRejected | AuthError):
        assert exc.detail.startswith("why "), "the server's reason is kept"
    if isinstance(exc.__cause__, httpx.TransportError):
        assert "on purpose" in str(exc.__cause__), "the httpx error stays on __cause__"


@pytest.mark.parametrize(("case", "handler", "error", "retryable", "_e", "_r"), TABLE, ids=IDS)
def test_a_request_maps_each_failure_to_one_agent_error(
    tmp_path: Path,
    case: str,
    handler: Handler,
    error: type[AgentError],
    retryable: bool,
    _e: type[AgentError],
    _r: bool,
) -> None:
    client = _client(handler, tmp_path)
    calls: list[Callable[[], object]] = [
        lambda: client.check_in("cred", _check_in_request()),
        lambda: client.upload_telemetry("cred", "phone-1", b"{}"),
    ]
    for call in calls:
        with pytest.raises(AgentError) as caught:
            call()
        _assert_mapped(caught.value, error, retryable)


@pytest.mark.parametrize(("case", "handler", "_e", "_r", "error", "retryable"), TABLE, ids=IDS)
def test_a_download_maps_each_failure_to_one_agent_error(
    tmp_path: Path,
    case: str,
    handler: Handler,
    _e: type[AgentError],
    _r: bool,
    error: type[AgentError],
    retryable: bool,
) -> None:
    client = _client(handler, tmp_path)
    with (
        pytest.raises(AgentError) as caught,
        client.download(f"{SERVER}/v1/bundles/x", offset=10, headers={}, stall_timeout_s=1.0),
    ):
        pass
    _assert_mapped(caught.value, error, retryable)


def test_a_body_that_breaks_off_mid_download_is_mapped_too(tmp_path: Path) -> None:
    class Broken(httpx.SyncByteStream):
        def __iter__(self):  # type: ignore[no-untyped-def]
            yield b"first bytes"
            raise httpx.ReadTimeout("on purpose")

    client = _client(lambda request: httpx.Response(200, stream=Broken()), tmp_path)
    received: list[bytes] = []
    with (
        pytest.raises(StallError, match=r"for 1\.0 s"),
        client.download(f"{SERVER}/b", offset=0, headers={}, stall_timeout_s=1.0) as stream,
    ):
        received.extend(stream.chunks())
    assert received == [b"first bytes"]


def test_check_in_returns_the_body_byte_for_byte(tmp_path: Path) -> None:
    # Not canonical JSON on purpose: the caller verifies exactly the bytes that came.
    body = b'{ "assignment_set":  {"x": 1},\n"withheld": {} }'
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=body)

    assert _client(handler, tmp_path).check_in("cred", _check_in_request()) == body
    assert seen[0].url.path == "/v1/devices/phone-1/check-in"
    assert seen[0].headers["authorization"] == "Bearer cred"


def test_a_missing_root_is_none_and_other_failures_still_raise(tmp_path: Path) -> None:
    assert _client(_status(404), tmp_path).root(2) is None
    with pytest.raises(AuthError):
        _client(_status(401), tmp_path).root(2)
    root = _client(lambda request: httpx.Response(200, content=b"root-2"), tmp_path).root(2)
    assert root == b"root-2"


def test_a_device_id_stays_one_path_segment(tmp_path: Path) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.raw_path.decode())
        return httpx.Response(200, json={"accepted": True, "replay": True, "windows": 0})

    receipt = _client(handler, tmp_path).upload_telemetry("cred", "../admin", b"{}")
    assert receipt.replay is True
    assert seen == ["/v1/devices/..%2Fadmin/telemetry"]
