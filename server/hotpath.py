"""The check-in hot path: one device, a few Core SQL statements, signatures, bytes out.

Every device calls this on a timer, so it avoids the ORM and FastAPI's threadpool: the device
row comes from one indexed SELECT by credential hash, release state from the per-target cache
(:func:`server.fleet.offers_for`), pins from one SELECT, and last-seen, nonce and reported state
go back in one UPDATE. Assignments are built as dicts in the shape of
:class:`~firmware_bundles.messages.Assignment` (the tests verify them with the shared parser).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlmodel import Session, col

from firmware_bundles.manifest import FirmwareRange
from firmware_bundles.messages import CheckInRequest
from firmware_bundles.signing import Envelope, canonical_json
from server.auth import hash_token
from server.errors import ApiError
from server.fleet import Offer, _offer, offers_for
from server.models import Device, Pin
from server.state import ServerState

_DEVICE_COLUMNS = (
    col(Device.id),
    col(Device.hardware_id),
    col(Device.firmware_version),
    col(Device.free_flash_bytes),
    col(Device.revoked),
    col(Device.relay_id),
)


def _row(conn: Any, where: Any) -> Any:
    return conn.execute(select(*_DEVICE_COLUMNS).where(where)).first()


def _update_self(columns: list[str]) -> Any:
    """UPDATE device ... WHERE credential and id match and not revoked RETURNING what check-in
    needs; built once (building SQLAlchemy expressions per request cost ~0.25 ms)."""
    return (
        update(Device)
        .where(
            col(Device.credential_hash) == bindparam("b_credential"),
            col(Device.id) == bindparam("b_device"),
            col(Device.revoked).is_(False),
        )
        .values({c: bindparam(f"v_{c}") for c in columns})
        .returning(col(Device.hardware_id), col(Device.free_flash_bytes))
    )


_STATE_COLUMNS = ["last_seen", "last_nonce", "firmware_version", "installed"]
_UPDATE_SELF = _update_self(_STATE_COLUMNS)
_UPDATE_SELF_CAPS = _update_self([*_STATE_COLUMNS, "free_flash_bytes", "free_ram_bytes"])


def pinned_devices(conn: Any, state: ServerState) -> set[str]:
    """Ids of devices with any pin, re-read at most every ``release_cache_ttl_s`` (and at once in
    the worker that changes a pin)."""
    cached = state.release_cache.get("__pinned__")
    if cached is not None and time.monotonic() - cached[0] < state.settings.release_cache_ttl_s:
        return cached[1]
    ids = {r[0] for r in conn.execute(select(col(Pin.device_id)).distinct())}
    state.release_cache["__pinned__"] = (time.monotonic(), ids)
    return ids


def check_in(state: ServerState, credential: str, device_id: str, request: CheckInRequest) -> bytes:
    """Authorise, record and answer one check-in; returns the JSON answer.

    Raises:
        ApiError: 401 for a bad credential, 403 when acting for an unpaired device, 400 when the
            body names another device.
    """
    if request.device_id != device_id:
        raise ApiError(400, f"check-in body is for {request.device_id}, URL for {device_id}")
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "last_seen": now,
        "last_nonce": request.nonce,
        "firmware_version": request.firmware_version,
        "installed": [m.to_dict() for m in request.installed],
    }
    if request.capabilities is not None:
        values["free_flash_bytes"] = request.capabilities.free_flash_bytes
        values["free_ram_bytes"] = request.capabilities.free_ram_bytes
    credential_hash = hash_token(credential)
    # Autocommit: the common case is one statement, atomic on its own, so no BEGIN/COMMIT
    # round trips to the database.
    with state.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        # The common case in one statement: a device checking in for itself.
        statement = _UPDATE_SELF_CAPS if request.capabilities is not None else _UPDATE_SELF
        device = conn.execute(
            statement,
            {
                "b_credential": credential_hash,
                "b_device": device_id,
                **{f"v_{k}": v for k, v in values.items()},
            },
        ).first()
        if device is None:  # a relay acting for its ring, or a bad credential
            caller = _row(conn, col(Device.credential_hash) == credential_hash)
            if caller is None or caller.revoked:
                raise ApiError(401, "a valid device credential is required")
            target = _row(conn, col(Device.id) == device_id)
            if target is None or target.relay_id != caller.id or target.revoked:
                raise ApiError(403, f"device {caller.id} may not act for device {device_id}")
            conn.execute(update(Device).where(col(Device.id) == device_id).values(**values))
            device = _row(conn, col(Device.id) == device_id)
        pins: Any = []
        if device_id in pinned_devices(conn, state):
            pins = conn.execute(
                select(col(Pin.model_name), col(Pin.version_id)).where(
                    col(Pin.device_id) == device_id
                )
            ).all()
    free_flash = device.free_flash_bytes
    cached = state.release_cache.get(device.hardware_id)
    if (
        cached is not None
        and not pins
        and (time.monotonic() - cached[0] < state.settings.release_cache_ttl_s)
    ):
        offers = cached[1]
    else:
        with Session(state.engine) as session:
            offers = dict(offers_for(session, state, device.hardware_id))
            for model, version_id in pins:
                pinned = _offer(session, version_id, device.hardware_id)
                if pinned is not None:
                    offers[model] = pinned
    issued = now.isoformat().replace("+00:00", "Z")
    expires = (now + timedelta(seconds=state.settings.assignment_ttl_s)).isoformat()
    expires = expires.replace("+00:00", "Z")
    assignments, withheld = [], {}
    for model, offer in sorted(offers.items()):
        reason = _why_not(offer, request.firmware_version, free_flash, device.hardware_id, model)
        if reason is not None:
            withheld[model] = reason
            continue
        signed = {
            "_type": "assignment",
            "device_id": device_id,
            "hardware_id": device.hardware_id,
            "model": model,
            "version": offer.version,
            "bundle_sha256": offer.sha256,
            "bundle_length": offer.length,
            "release_counter": offer.release_counter,
            "download_url": f"/v1/bundles/{offer.sha256}",
            "issued_at": issued,
            "expires_at": expires,
            "nonce": request.nonce,
        }
        envelope = Envelope(signed=signed)
        envelope.sign(state.director_key)
        assignments.append(envelope.to_dict())
    return canonical_json(
        {
            "assignments": assignments,
            "withheld": withheld,
            "next_check_in_s": state.settings.next_check_in_s,
        }
    )


def _why_not(
    offer: Offer, firmware: str, free_flash: int, hardware_id: str, model: str
) -> str | None:
    if offer.sha256 is None:
        return f"{model} {offer.version} has no bundle for {hardware_id}"
    if not FirmwareRange(minimum=offer.firmware_min, below=offer.firmware_below).contains(firmware):
        return f"firmware {firmware} outside the bundle's range >={offer.firmware_min}" + (
            f",<{offer.firmware_below}" if offer.firmware_below else ""
        )
    if offer.length > free_flash:
        return f"bundle is {offer.length} bytes, device has {free_flash} free"
    return None
