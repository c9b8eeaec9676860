"""The fleet server's device API over HTTP, and this device's credential in the state dir.

:class:`FleetClient` speaks the routes the server serves to devices (enroll, check-in, the root
chain; downloads and telemetry go through :mod:`device_agent.fetch` and
:mod:`device_agent.outbox`) and maps every HTTP failure to our errors where it enters. It decides
nothing about trust: what it returns is bytes or parsed, unverified documents.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import httpx

from device_agent.errors import (
    AuthError,
    ConfigError,
    ServerRejected,
    ServerUnreachable,
)
from device_agent.fetch import GATEWAY_STATUSES, resolve_url
from device_agent.slots import write_atomic
from firmware_bundles.messages import CapabilityReport, CheckInRequest
from firmware_bundles.signing import canonical_json

CREDENTIALS_FILE = "credentials.json"
_MAX_DETAIL_CHARS = 500


class FleetClient:
    """One device's HTTP client for the fleet server.

    Args:
        http: The HTTP client (a test hands one with a simulator's transport).
        server_url: The server's base URL (may carry a path prefix).
        state_dir: Where ``credentials.json`` (mode 0600) is kept.
        timeout_s: Timeout of each request.
    """

    def __init__(self, http: httpx.Client, server_url: str, state_dir: Path, timeout_s: float):
        self.http = http
        self.server_url = server_url
        self.credentials_path = state_dir / CREDENTIALS_FILE
        self.timeout_s = timeout_s

    def call(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        credential: str | None = None,
        allow: tuple[int, ...] = (),
    ) -> httpx.Response:
        """One request; statuses in ``allow`` are returned rather than raised.

        Raises:
            ServerUnreachable: On a connection failure or timeout, or a gateway's 502-504.
            AuthError: On 401/403.
            ServerRejected: On any other error status.
        """
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if credential is not None:
            headers["Authorization"] = f"Bearer {credential}"
        url = resolve_url(self.server_url, path)
        try:
            response = self.http.request(
                method, url, content=body, headers=headers, timeout=self.timeout_s
            )
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"{method} {url}: {exc!r}") from exc
        status = response.status_code
        if status < 400 or status in allow:
            return response
        detail = error_detail(response)
        if status in (401, 403):
            raise AuthError(status, detail)
        if status in GATEWAY_STATUSES:
            raise ServerUnreachable(f"{method} {url}: gateway answered {status}: {detail}")
        raise ServerRejected(status, detail)

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
        body = {
            "enroll_token": enroll_token,
            "device_id": device_id,
            "capabilities": capabilities.to_dict(),
        }
        response = self.call("POST", "/v1/devices/enroll", body=canonical_json(body))
        try:
            credential = str(response.json()["credential"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ServerRejected(response.status_code, "enroll answer has no credential") from exc
        record = {"device_id": device_id, "credential": credential, "server_url": self.server_url}
        write_atomic(self.credentials_path, json.dumps(record).encode(), 0o600)
        return credential

    # -- device routes ----------------------------------------------------------------------

    def root(self, version: int) -> bytes | None:
        """``GET /v1/roots/{version}.json``: root ``version``'s bytes, or None if there is none.

        Raises:
            ServerUnreachable, AuthError, ServerRejected: As :meth:`call`.
        """
        response = self.call("GET", f"/v1/roots/{version}.json", allow=(404,))
        return None if response.status_code == 404 else response.content

    def check_in(self, credential: str, request: CheckInRequest) -> bytes:
        """``POST /v1/devices/{id}/check-in``: the server's answer, the bytes as received.

        The answer is a signed envelope; :class:`~device_agent.trust.TrustedState` verifies
        these very bytes, so nothing here parses or re-serialises them.

        Raises:
            ServerUnreachable, AuthError, ServerRejected: As :meth:`call`.
        """
        response = self.call(
            "POST",
            f"/v1/devices/{request.device_id}/check-in",
            body=request.to_bytes(),
            credential=credential,
        )
        return response.content


def error_detail(response: httpx.Response) -> str:
    """The server's reason (``{"detail": ...}``), or the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, Mapping) and "detail" in body:
        return str(body["detail"])[:_MAX_DETAIL_CHARS]
    return response.text[:200]
