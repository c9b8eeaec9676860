"""FleetSimulator: an in-memory stand-in for the fleet server, for focused agent tests only.

It is a simulator, not the server: it speaks the real server's HTTP API shape (the routes, the
``Authorization: Bearer`` device credential, the bodies of ``server/routes/devices.py``,
``server/hotpath.py``, ``server/routes/registry.py``, ``server/routes/telemetry.py`` and the root
chain at ``/v1/roots/N.json``) behind an ``httpx.MockTransport``, and lets a test turn it hostile
in one line, as python-tuf's ``RepositorySimulator`` does::

    sim.assignment_overrides["release_counter"] = 3   # lie in the signed assignment
    sim.stall_after_bytes = 100                        # stop sending after 100 bytes
    sim.director_key = SigningKey.generate()           # sign with a key the root does not list

End-to-end tests run the real server under uvicorn instead.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx

from firmware_bundles import SigningKey, open_bundle
from firmware_bundles.check_in import check_in_answer
from firmware_bundles.messages import (
    AssignedBundle,
    CapabilityReport,
    CheckInRequest,
    TelemetryBatch,
)
from firmware_bundles.signing import canonical_json

#: Fields of the signed set (the rest of ``assignment_overrides`` go into every bundle entry).
SET_FIELDS = {
    "device_id",
    "hardware_id",
    "nonce",
    "issued_at",
    "expires_at",
    "withheld",
    "next_check_in_s",
}
_RANGE = re.compile(r"^bytes=(\d+)-$")


class FakeClock:
    """A clock a test moves by hand; the agent and the simulator share one."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class SimDevice:
    """One enrolled device as the simulator sees it."""

    device_id: str
    credential: str
    capabilities: CapabilityReport
    check_ins: list[CheckInRequest] = field(default_factory=list)


@dataclass
class SimRequest:
    """One request the simulator answered (for assertions on Range and bytes served); a
    download's ``bytes_sent`` grows as its body streams."""

    method: str
    path: str
    range_start: int | None
    status: int
    bytes_sent: int = 0


class FleetSimulator:
    """An in-memory fleet server for agent tests (a simulator; see the module docstring).

    Args:
        director_key: The director key the root lists.
        root_bytes: The envelope of root version 1.
        clock: The simulator's time (assignments are issued at it).
    """

    base_url = "https://fleet.simulator"

    def __init__(self, director_key: SigningKey, root_bytes: bytes, clock: FakeClock) -> None:
        self.director_key = director_key
        self.clock = clock
        self.roots: dict[int, bytes] = {1: root_bytes}
        self.bundles: dict[str, bytes] = {}
        #: SHA-256 -> (version, release counter, length), kept when a bundle's bytes are deleted.
        self.described: dict[str, tuple[str, int, int]] = {}
        #: model -> SHA-256 of the bundle the director assigns.
        self.offers: dict[str, str] = {}
        self.withheld: dict[str, str] = {}
        self.enroll_tokens: set[str] = {"efe_simulated"}
        self.devices: dict[str, SimDevice] = {}
        self.assignment_ttl_s = 3600
        self.next_check_in_s = 300
        # Hostile behaviour, one attribute each.
        self.assignment_overrides: dict[str, Any] = {}
        self.replay_last_answer = False
        #: Edits the check-in answer (parsed JSON) after it was signed, as a path attacker would.
        self.tamper_answer: Callable[[dict[str, Any]], None] | None = None
        self.stall_after_bytes: int | None = None
        self.drip_s = 0.0
        self.extra_bytes = 0
        self.announce_length: int | None = None
        self.tamper_offset: int | None = None
        self.ignore_range = False
        self.offline = False
        self.chunk_bytes = 256
        # What happened.
        self.requests: list[SimRequest] = []
        self.telemetry: list[TelemetryBatch] = []
        self._telemetry_keys: set[tuple[str, int, int]] = set()
        self._last_answer: dict[str, bytes] = {}

    # -- set-up ------------------------------------------------------------------------------

    def publish(self, data: bytes) -> str:
        """Store a bundle; returns its SHA-256."""
        bundle_sha256 = hashlib.sha256(data).hexdigest()
        self.bundles[bundle_sha256] = data
        manifest = open_bundle(data).manifest
        self.described[bundle_sha256] = (manifest.version, manifest.release_counter, len(data))
        return bundle_sha256

    def assign(self, model: str, data: bytes) -> str:
        """Publish ``data`` and have the director assign it for ``model``."""
        bundle_sha256 = self.publish(data)
        self.offers[model] = bundle_sha256
        return bundle_sha256

    def client(self) -> httpx.Client:
        """An HTTP client whose every request this simulator answers."""
        return httpx.Client(transport=httpx.MockTransport(self.handle))

    # -- what a test asserts on --------------------------------------------------------------

    def downloads(self, bundle_sha256: str) -> list[SimRequest]:
        """Every download request for bundle ``bundle_sha256``."""
        return [r for r in self.requests if r.path == f"/v1/bundles/{bundle_sha256}"]

    def bytes_served(self, bundle_sha256: str) -> int:
        """Body bytes sent for bundle ``bundle_sha256`` over all requests."""
        return sum(r.bytes_sent for r in self.downloads(bundle_sha256))

    # -- the API -----------------------------------------------------------------------------

    def handle(self, request: httpx.Request) -> httpx.Response:
        if self.offline:
            raise httpx.ConnectError("simulated: connection refused", request=request)
        path = request.url.path
        if request.method == "POST" and path == "/v1/devices/enroll":
            return self._log(request, self._enroll(request))
        if m := re.fullmatch(r"/v1/devices/([^/]+)/check-in", path):
            return self._log(request, self._check_in(request, m.group(1)))
        if m := re.fullmatch(r"/v1/devices/([^/]+)/telemetry", path):
            return self._log(request, self._telemetry(request, m.group(1)))
        if m := re.fullmatch(r"/v1/roots/(\d+)\.json", path):
            data = self.roots.get(int(m.group(1)))
            if data is None:
                return self._log(request, _detail(404, f"no root version {m.group(1)}"))
            return self._log(request, httpx.Response(200, content=data))
        if m := re.fullmatch(r"/v1/bundles/([0-9a-f]{64})", path):
            return self._download(request, m.group(1))
        return self._log(request, _detail(404, "Not Found"))

    def _log(self, request: httpx.Request, response: httpx.Response) -> httpx.Response:
        self.requests.append(
            SimRequest(request.method, request.url.path, None, response.status_code)
        )
        return response

    def _device(self, request: httpx.Request) -> SimDevice | None:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            return None
        token = header[7:].strip()
        return next((d for d in self.devices.values() if d.credential == token), None)

    def _enroll(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if body.get("enroll_token") not in self.enroll_tokens:
            return _detail(401, "enrollment token is not valid")
        device_id = body["device_id"]
        if device_id in self.devices:
            return _detail(409, f"device {device_id} is already enrolled")
        caps = CapabilityReport.from_dict(body["capabilities"])
        credential = (
            f"efd_sim_{len(self.devices)}_{hashlib.sha256(device_id.encode()).hexdigest()[:16]}"
        )
        self.devices[device_id] = SimDevice(device_id, credential, caps)
        return httpx.Response(201, json={"device_id": device_id, "credential": credential})

    def _acting_for(
        self, request: httpx.Request, device_id: str, unknown: str
    ) -> SimDevice | httpx.Response:
        """The device whose credential ``request`` carries, if it is ``device_id``; else the
        refusal (401 with the route's ``unknown`` message, or 403)."""
        device = self._device(request)
        if device is None:
            return _detail(401, unknown)
        if device.device_id != device_id:
            return _detail(403, f"device {device.device_id} may not act for device {device_id}")
        return device

    def _check_in(self, request: httpx.Request, device_id: str) -> httpx.Response:
        device = self._acting_for(request, device_id, "a valid device credential is required")
        if isinstance(device, httpx.Response):
            return device
        body = CheckInRequest.from_bytes(request.content)
        device.check_ins.append(body)
        if self.replay_last_answer and device_id in self._last_answer:
            return httpx.Response(200, content=self._last_answer[device_id])
        now = self.clock()
        signed: dict[str, Any] = {
            "device_id": device_id,
            "hardware_id": device.capabilities.hardware_id,
            "nonce": body.nonce,
            "issued_at": now,
            "expires_at": now + timedelta(seconds=self.assignment_ttl_s),
            "withheld": self.withheld,
            "next_check_in_s": self.next_check_in_s,
        }
        entries = []
        for model, bundle_sha256 in sorted(self.offers.items()):
            version, counter, length = self.described[bundle_sha256]
            entry = {
                "model": model,
                "version": version,
                "bundle_sha256": bundle_sha256,
                "bundle_length": length,
                "release_counter": counter,
                "download_url": f"/v1/bundles/{bundle_sha256}",
            }
            entry.update(
                {k: v for k, v in self.assignment_overrides.items() if k not in SET_FIELDS}
            )
            entries.append(AssignedBundle.from_dict(entry))
        signed.update({k: v for k, v in self.assignment_overrides.items() if k in SET_FIELDS})
        # Built as the server builds it (no validation of the set), so a test can have the
        # director sign what a device must still refuse.
        answer = check_in_answer(self.director_key, bundles=entries, **signed)
        if self.tamper_answer is not None:
            document = json.loads(answer)
            self.tamper_answer(document)
            answer = canonical_json(document)
        self._last_answer[device_id] = answer
        return httpx.Response(200, content=answer, headers={"content-type": "application/json"})

    def _telemetry(self, request: httpx.Request, device_id: str) -> httpx.Response:
        refused = self._acting_for(
            request, device_id, "device credential is not valid or was revoked"
        )
        if isinstance(refused, httpx.Response):
            return refused
        batch = TelemetryBatch.from_bytes(request.content)
        accepted = batch.idempotency_key not in self._telemetry_keys
        if accepted:
            self._telemetry_keys.add(batch.idempotency_key)
            self.telemetry.append(batch)
        return httpx.Response(
            200, json={"accepted": accepted, "replay": not accepted, "windows": len(batch.windows)}
        )

    def _download(self, request: httpx.Request, bundle_sha256: str) -> httpx.Response:
        if self._device(request) is None:
            return self._log(request, _detail(401, "device credential is not valid or was revoked"))
        data = self.bundles.get(bundle_sha256)
        if data is None:
            return self._log(request, _detail(404, f"no bundle {bundle_sha256}"))
        if self.tamper_offset is not None:
            flipped = bytearray(data)
            flipped[self.tamper_offset] ^= 0xFF
            data = bytes(flipped)
        body = data + b"\0" * self.extra_bytes
        start = 0
        match = _RANGE.match(request.headers.get("range", ""))
        headers = {"etag": f'"{bundle_sha256}"', "accept-ranges": "bytes"}
        status = 200
        if match is not None and not self.ignore_range:
            start = int(match.group(1))
            if start >= len(data):
                return self._log(request, _detail(416, "range not satisfiable"))
            status = 206
            headers["content-range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
        announced = self.announce_length if self.announce_length is not None else len(body) - start
        headers["content-length"] = str(announced)
        entry = SimRequest(request.method, request.url.path, start if match else None, status)
        self.requests.append(entry)
        return httpx.Response(status, headers=headers, content=self._stream(body[start:], entry))

    def _stream(self, body: bytes, entry: SimRequest) -> Iterator[bytes]:
        sent = 0
        for i in range(0, len(body), self.chunk_bytes):
            chunk = body[i : i + self.chunk_bytes]
            if self.stall_after_bytes is not None and sent + len(chunk) > self.stall_after_bytes:
                chunk = chunk[: max(0, self.stall_after_bytes - sent)]
                if chunk:
                    entry.bytes_sent += len(chunk)
                    yield chunk
                # What httpx raises when the socket stays silent for the read timeout.
                raise httpx.ReadTimeout("simulated: no bytes within the read timeout")
            if self.drip_s and i:
                self.clock.advance(self.drip_s)
            sent += len(chunk)
            entry.bytes_sent += len(chunk)
            yield chunk


def _detail(status: int, reason: str) -> httpx.Response:
    """An error answer in the server's shape (``{"detail": reason}``)."""
    return httpx.Response(status, json={"detail": reason})
