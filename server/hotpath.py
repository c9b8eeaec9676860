"""The check-in hot path: one device, one SQL statement, one signature, bytes out.

Every device calls this on a timer, so it avoids the ORM and FastAPI's threadpool: one
``UPDATE ... RETURNING`` authenticates the device by credential hash and records last-seen, nonce
and reported state (run on the raw driver connection, SQLite in the event loop, PostgreSQL on an
asyncio connection pool so the loop serves other requests while the database works), and returns
the state hash the device event log last recorded, so that events are written only when the
reported state changed (:mod:`server.device_events`); what the
device is offered, and the release counter confirmed for it per model (``docs/rollback.md``),
come from :mod:`server.offers` (cached); and the answer is the envelope of one
director-signed :class:`~firmware_bundles.messages.AssignmentSet`, built by
:func:`firmware_bundles.check_in.check_in_answer`.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import select, update
from sqlmodel import col

from firmware_bundles.check_in import check_in_answer
from firmware_bundles.manifest import FirmwareRange
from firmware_bundles.messages import AssignedBundle, CheckInRequest, ShadowBundle
from server import device_events
from server.auth import hash_token
from server.checkin_store import Contact, DeviceRow
from server.errors import ApiError
from server.models import Device, DeviceState
from server.offers import Offer, confirmed_for_hardware, offers_for_device
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


def _relay_check_in(state: ServerState, contact: Contact) -> DeviceRow:
    """A relay (phone) checking in for its paired ring: the uncommon case, on the ORM engine.

    Raises:
        ApiError: 401 for a bad credential, 403 when the caller is not the device's relay.
    """
    device_id = contact.device_id
    values: dict[str, Any] = {
        "last_seen": contact.last_seen,
        "last_nonce": contact.nonce,
        "firmware_version": contact.firmware_version,
        "installed": contact.installed,
    }
    if contact.free_flash_bytes is not None:
        values["free_flash_bytes"] = contact.free_flash_bytes
        values["free_ram_bytes"] = contact.free_ram_bytes
    with state.engine.begin() as conn:
        caller = _row(conn, col(Device.credential_hash) == contact.credential_hash)
        if caller is None or caller.revoked:
            raise ApiError(401, "a valid device credential is required")
        target = _row(conn, col(Device.id) == device_id)
        if target is None or target.relay_id != caller.id or target.revoked:
            raise ApiError(403, f"device {caller.id} may not act for device {device_id}")
        conn.execute(update(Device).where(col(Device.id) == device_id).values(**values))
        recorded = conn.execute(
            select(col(DeviceState.state_hash)).where(col(DeviceState.device_id) == device_id)
        ).scalar()
        return DeviceRow(
            target.hardware_id, values.get("free_flash_bytes", target.free_flash_bytes), recorded
        )


async def check_in(
    state: ServerState, credential: str, device_id: str, request: CheckInRequest
) -> bytes:
    """Authorise, record and answer one check-in; returns the JSON answer.

    Raises:
        ApiError: 401 for a bad credential, 403 when acting for an unpaired device, 400 when the
            body names another device.
    """
    if request.device_id != device_id:
        raise ApiError(400, f"check-in body is for {request.device_id}, URL for {device_id}")
    now = datetime.now(UTC)
    caps = request.capabilities
    installed = [m.to_dict() for m in request.installed]
    contact = Contact(
        credential_hash=hash_token(credential),
        device_id=device_id,
        last_seen=now,
        nonce=request.nonce,
        firmware_version=request.firmware_version,
        installed=installed,
        state_hash=device_events.state_hash(request.firmware_version, installed),
        free_flash_bytes=None if caps is None else caps.free_flash_bytes,
        free_ram_bytes=None if caps is None else caps.free_ram_bytes,
    )
    # The common case in one statement: a device checking in for itself.
    device = await state.check_in_store.record(contact)
    if device is None:
        device = await asyncio.to_thread(_relay_check_in, state, contact)
    running = {m.model: m.version for m in request.installed if m.version is not None}
    offers = await offers_for_device(
        state, device_id, device.hardware_id, request.firmware_version, running
    )
    confirmed = await confirmed_for_hardware(state, device.hardware_id)
    bundles, withheld = [], {}
    for model, offer in sorted(offers.items()):
        reason = _why_not(
            offer, request.firmware_version, device.free_flash_bytes, device.hardware_id, model
        )
        if reason is not None:
            withheld[model] = reason
            continue
        counter = confirmed.counter(model, device_id, state.offers.rollout_member)
        bundles.append(_assigned(model, offer, counter or None))
    if device.recorded_state_hash != contact.state_hash:
        assigned = {
            m: device_events.Assigned(o.version, o.bundle_sha256) for m, o in offers.items()
        }
        reported = device_events.Reported(request.firmware_version, installed)
        await asyncio.to_thread(
            device_events.record_report,
            state.engine,
            device_id,
            device.hardware_id,
            reported,
            contact.state_hash,
            now,
            assigned,
        )
    return check_in_answer(
        state.director_key,
        device_id=device_id,
        hardware_id=device.hardware_id,
        nonce=request.nonce,
        issued_at=now,
        expires_at=now + timedelta(seconds=state.settings.assignment_ttl_s),
        bundles=bundles,
        withheld=withheld,
        next_check_in_s=state.settings.next_check_in_s,
    )


@lru_cache(maxsize=4096)
def _assigned(model: str, offer: Offer, confirmed: int | None) -> AssignedBundle:
    """The set's entry for an offer with a bundle, validated once per offer and confirmed
    counter (offers are immutable; the release cache hands out the same ones until a release
    changes). ``confirmed`` is None while nothing is confirmed, so the entry reads as before
    (docs/check-in.md)."""
    return AssignedBundle(
        model=model,
        **_bundle_fields(offer),
        confirmed_release_counter=confirmed,
        shadow=_shadow(offer.shadow, offer.shadow_fraction),
    )


def _shadow(candidate: Offer | None, fraction: float) -> ShadowBundle | None:
    """The entry's shadow candidate, when the offer carries one with a bundle."""
    if candidate is None or candidate.bundle_sha256 is None:
        return None
    return ShadowBundle(**_bundle_fields(candidate), sample_fraction=fraction)


def _bundle_fields(offer: Offer) -> dict[str, Any]:
    """What an entry and its shadow candidate both say of an offered bundle: its version,
    SHA-256, length, release counter and where to download it."""
    return {
        "version": offer.version,
        "bundle_sha256": offer.bundle_sha256,
        "bundle_length": offer.length,
        "release_counter": offer.release_counter,
        "download_url": f"/v1/bundles/{offer.bundle_sha256}",
    }


@lru_cache(maxsize=4096)
def _firmware_fits(minimum: str, below: str | None, firmware: str) -> bool:
    return FirmwareRange(minimum=minimum, below=below).contains(firmware)


def _why_not(
    offer: Offer, firmware: str, free_flash: int, hardware_id: str, model: str
) -> str | None:
    if offer.bundle_sha256 is None:
        return f"{model} {offer.version} has no bundle for {hardware_id}"
    if not _firmware_fits(offer.firmware_min, offer.firmware_below, firmware):
        return f"firmware {firmware} outside the bundle's range >={offer.firmware_min}" + (
            f",<{offer.firmware_below}" if offer.firmware_below else ""
        )
    if offer.length > free_flash:
        return f"bundle is {offer.length} bytes, device has {free_flash} free"
    return None
