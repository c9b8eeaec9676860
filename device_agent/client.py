"""The agent's one HTTP boundary: every device route it and the ring relay call, and the one place
where HTTP statuses and httpx errors become agent errors.

:class:`FleetClient` speaks enroll, relay-enroll, check-in (the device's own, or its paired
ring's), the root chain, bundle downloads with ``Range``, and telemetry upload (own or ring's).
It decides nothing about trust, retries nothing and drops nothing: it returns bytes (or a small
parsed answer) and raises our errors, mapped here with ``raise ... from exc``:

==========================  ===============================================  =========
what happened               agent error                                      retryable
==========================  ===============================================  =========
connect error, timeout      :class:`ServerUnreachable` (a download that      yes
                            stops sending: :class:`StallError`)
401, 403                    :class:`AuthError`                               no
404, 410                    :class:`NotFound` (download:                     no
                            :class:`NotOfferedError`)
400, 413, 422               :class:`InvalidRequest`                          no
416                         :class:`ServerRejected` (download:               no (yes)
                            :class:`ResumeRefused`)
429                         :class:`ServerRejected`                          yes
502, 503, 504               :class:`ServerUnreachable` (a gateway)           yes
other 5xx                   :class:`ServerRejected`                          yes
other 4xx (409, ...)        :class:`ServerRejected`                          no
3xx (not followed)          :class:`ServerRejected`                          no
==========================  ===============================================  =========

Only a 2xx is success: a redirect is not followed, and a telemetry batch it answered stays
pending rather than being taken as delivered.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx

from device_agent.errors import (
    AgentError,
    AuthError,
    ConfigError,
    InvalidRequest,
    NotFound,
    NotOfferedError,
    ResumeRefused,
    ServerRejected,
    ServerUnreachable,
    StallError,
)
from device_agent.fsutil import write_atomic
from firmware_bundles.messages import CapabilityReport, CheckInRequest
from firmware_bundles.signing import canonical_json

CREDENTIALS_FILE = "credentials.json"
_MAX_DETAIL_CHARS = 500
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
#: Gateways answering for a server that is down: the same as unreachable.
_GATEWAY = frozenset({502, 503, 504})
#: The server will never accept the request as it was sent.
_INVALID = frozenset({400, 413, 422})
_GONE = frozenset({404, 410})


def resolve_url(base_url: str, ref: str) -> str:
    """``ref`` (a path such as ``/v1/bundles/...``, or an absolute URL) against the server URL,
    keeping any path prefix the server is mounted under."""
    if urlsplit(ref).scheme:
        return ref
    return f"{base_url.rstrip('/')}/{ref.lstrip('/')}"


def error_for_status(status: int, detail: str, what: str, *, download: bool = False) -> AgentError:
    """The agent error for an HTTP error ``status`` (the table in the module docstring).

    Args:
        status: The HTTP status, anything but 2xx.
        detail: The server's reason.
        what: The request, for messages (``GET https://...``).
        download: Whether the request was a bundle download (404/410 and 416 mean more there).
    """
    if status in (401, 403):
        return AuthError(status, detail)
    if status in _GATEWAY:
        return ServerUnreachable(f"{what}: gateway answered {status}: {detail}")
    if download and status in _GONE:
        return NotOfferedError(f"server no longer offers {what} ({status})", what)
    if download and status == 416:
        return ResumeRefused(f"server refused the range of {what}; restarting", what)
    if status in _GONE:
        return NotFound(status, detail)
    if status in _INVALID:
        return InvalidRequest(status, detail)
    return ServerRejected(status, detail)


def error_for_transport(
    exc: httpx.TransportError, what: str, *, stall_timeout_s: float | None = None
) -> AgentError:
    """The agent error for an httpx transport failure (connection, timeout, broken body).

    Args:
        exc: What httpx raised.
        what: The request, for messages.
        stall_timeout_s: Set for a bundle download, where a read timeout is a stall (the
            slow-retrieval defence) rather than the server going away.
    """
    if stall_timeout_s is not None and isinstance(exc, httpx.ReadTimeout):
        return StallError(f"no bytes from {what} for {stall_timeout_s} s", what)
    return ServerUnreachable(f"{what}: {exc!r}")


@dataclass(frozen=True)
class TelemetryReceipt:
    """The server's answer to a telemetry batch: ``replay`` if it already had that key."""

    replay: bool


class BundleStream:
    """An open bundle download whose status was accepted.

    Attributes:
        url: The URL being fetched.
        partial: Whether the server answered 206 (a part of the bundle).
        start: The offset of the body's first byte in the bundle (0 unless a 206 resumes).
        total: The bundle's whole length as the server states it (206 only), if it does.
        announced: The body's ``Content-Length``, if sent.
    """

    def __init__(
        self,
        response: httpx.Response,
        url: str,
        start: int,
        total: int | None,
        stall_timeout_s: float,
    ) -> None:
        self._response = response
        self._stall_timeout_s = stall_timeout_s
        self.url = url
        self.partial = response.status_code == 206
        self.start = start
        self.total = total
        value = response.headers.get("content-length")
        self.announced = int(value) if value is not None and value.isdigit() else None

    def chunks(self) -> Iterator[bytes]:
        """The body as it arrives.

        Raises:
            StallError: If no bytes came within the stall timeout.
            ServerUnreachable: If the connection broke.
        """
        try:
            yield from self._response.iter_bytes()
        except httpx.TransportError as exc:
            raise error_for_transport(exc, self.url, stall_timeout_s=self._stall_timeout_s) from exc


class FleetClient:
    """One device's HTTP client for the fleet server (and the CDN its assignments may name).

    Args:
        http: The HTTP client (a test hands one with a simulator's transport).
        server_url: The server's base URL (may carry a path prefix).
        state_dir: Where ``credentials.json`` (mode 0600) is kept.
        timeout_s: Timeout of each request (a download's reads have the stall timeout instead).
    """

    def __init__(self, http: httpx.Client, server_url: str, state_dir: Path, timeout_s: float):
        self.http = http
        self.server_url = server_url
        self.credentials_path = state_dir / CREDENTIALS_FILE
        self.timeout_s = timeout_s

    def _request(
        self, method: str, path: str, *, body: bytes | None = None, credential: str | None = None
    ) -> httpx.Response:
        """One request to the server; a successful response, or our error.

        Raises:
            ServerUnreachable, AuthError, ServerRejected: As the module docstring's table.
        """
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if credential is not None:
            headers["Authorization"] = f"Bearer {credential}"
        url = resolve_url(self.server_url, path)
        what = f"{method} {url}"
        try:
            response = self.http.request(
                method, url, content=body, headers=headers, timeout=self.timeout_s
            )
        except httpx.TransportError as exc:
            raise error_for_transport(exc, what) from exc
        if not response.is_success:
            raise error_for_status(response.status_code, error_detail(response), what)
        return response

    # -- credentials ------------------------------------------------------------------------

    def credential(self) -> str | None:
        """This device's credential, if it has enrolled.

        Raises:
            ConfigError: If the credentials file exists but cannot be read.
        """
        try:
            data = json.loads(self.credentials_path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise ConfigError(f"{self.credentials_path} is unreadable: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("credential"), str):
            raise ConfigError(f"{self.credentials_path} has no credential")
        return str(data["credential"])

    def enroll(self, enroll_token: str, device_id: str, capabilities: CapabilityReport) -> str:
        """``POST /v1/devices/enroll``; keeps the credential (shown once) in the state dir.

        Returns:
            The credential.

        Raises:
            ServerUnreachable: If the server cannot be reached.
            AuthError: If the token is refused.
            ServerRejected: On another refusal (409: the device id is taken).
        """
        body = _enrollment(enroll_token, device_id, capabilities)
        response = self._request("POST", "/v1/devices/enroll", body=body)
        credential = str(_field(response, "credential"))
        record = {"device_id": device_id, "credential": credential, "server_url": self.server_url}
        write_atomic(self.credentials_path, json.dumps(record).encode(), 0o600)
        return credential

    def relay_enroll(
        self,
        credential: str,
        relay_id: str,
        *,
        enroll_token: str,
        device_id: str,
        capabilities: CapabilityReport,
    ) -> None:
        """``POST /v1/devices/{relay_id}/relay-enroll``: this phone enrolls its ring, which the
        server records as paired (the ring's own credential is not kept: the phone speaks for it).

        Raises:
            ServerUnreachable, AuthError, ServerRejected: As the module docstring's table.
        """
        body = _enrollment(enroll_token, device_id, capabilities)
        self._request(
            "POST", f"/v1/devices/{_seg(relay_id)}/relay-enroll", body=body, credential=credential
        )

    # -- device routes ----------------------------------------------------------------------

    def root(self, version: int) -> bytes | None:
        """``GET /v1/roots/{version}.json``: root ``version``'s bytes, or None if there is none.

        Raises:
            ServerUnreachable, AuthError, ServerRejected: As the module docstring's table.
        """
        try:
            return self._request("GET", f"/v1/roots/{version}.json").content
        except NotFound:
            return None

    def check_in(self, credential: str, request: CheckInRequest) -> bytes:
        """``POST /v1/devices/{id}/check-in`` (the device's own, or its paired ring's).

        The answer is a signed envelope; :class:`~device_agent.trust.TrustedState` verifies
        these very bytes, so nothing here parses or re-serialises them.

        Raises:
            ServerUnreachable, AuthError, ServerRejected: As the module docstring's table.
        """
        response = self._request(
            "POST",
            f"/v1/devices/{_seg(request.device_id)}/check-in",
            body=request.to_bytes(),
            credential=credential,
        )
        return response.content

    def upload_telemetry(self, credential: str, device_id: str, batch: bytes) -> TelemetryReceipt:
        """``POST /v1/devices/{device_id}/telemetry``: one batch (the device's own, or its ring's).

        Raises:
            InvalidRequest: The server will never accept this batch (malformed, too big).
            ServerUnreachable, AuthError, ServerRejected: As the module docstring's table.
        """
        response = self._request(
            "POST", f"/v1/devices/{_seg(device_id)}/telemetry", body=batch, credential=credential
        )
        try:
            answer = response.json()
        except ValueError:
            answer = None
        # Any 2xx means the server has the batch; "replay" only says it had it already.
        return TelemetryReceipt(replay=isinstance(answer, dict) and answer.get("replay") is True)

    @contextlib.contextmanager
    def download(
        self,
        url: str,
        *,
        offset: int,
        headers: Mapping[str, str],
        stall_timeout_s: float,
    ) -> Iterator[BundleStream]:
        """``GET`` a bundle from byte ``offset`` on (``Range: bytes=N-`` when not 0).

        Args:
            url: The absolute URL (the server's, or a CDN's).
            offset: Bytes already on disk.
            headers: Extra headers (the credential, for the server's own URLs only).
            stall_timeout_s: Longest wait for the next bytes.

        Yields:
            The open stream, its status accepted and its ``Content-Range`` parsed.

        Raises:
            NotOfferedError: On 404/410.
            ResumeRefused: On 416, or a 206 whose ``Content-Range`` is unusable.
            StallError: If no bytes came within ``stall_timeout_s``.
            ServerUnreachable, AuthError, ServerRejected: As the module docstring's table.
        """
        request_headers = dict(headers)
        if offset > 0:
            request_headers["Range"] = f"bytes={offset}-"
        timeout = httpx.Timeout(self.timeout_s, read=stall_timeout_s)
        try:
            with self.http.stream("GET", url, headers=request_headers, timeout=timeout) as resp:
                yield _bundle_stream(resp, url, stall_timeout_s)
        except httpx.TransportError as exc:
            raise error_for_transport(exc, url, stall_timeout_s=stall_timeout_s) from exc


def _bundle_stream(response: httpx.Response, url: str, stall_timeout_s: float) -> BundleStream:
    if not response.is_success:
        response.read()
        raise error_for_status(response.status_code, error_detail(response), url, download=True)
    if response.status_code != 206:
        return BundleStream(response, url, 0, None, stall_timeout_s)
    match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
    if match is None:
        raise ResumeRefused(f"206 from {url} without a usable Content-Range", url)
    total = None if match.group(3) == "*" else int(match.group(3))
    return BundleStream(response, url, int(match.group(1)), total, stall_timeout_s)


def error_detail(response: httpx.Response) -> str:
    """The server's reason (``{"detail": ...}``), or the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:_MAX_DETAIL_CHARS]
    if isinstance(body, Mapping) and "detail" in body:
        return str(body["detail"])[:_MAX_DETAIL_CHARS]
    return response.text[:_MAX_DETAIL_CHARS]


def _enrollment(enroll_token: str, device_id: str, capabilities: CapabilityReport) -> bytes:
    body = {"enroll_token": enroll_token, "device_id": device_id}
    return canonical_json({**body, "capabilities": capabilities.to_dict()})


def _field(response: httpx.Response, name: str) -> object:
    """A field of a JSON answer the server sent with a success status."""
    try:
        return response.json()[name]
    except (ValueError, KeyError, TypeError) as exc:
        raise ServerRejected(
            response.status_code, f"{response.request.url.path}: answer has no {name}"
        ) from exc


def _seg(value: str) -> str:
    # A device id is one path segment; quoting keeps a hostile one from reaching another route.
    return quote(value, safe="")
