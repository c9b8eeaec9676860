"""Devices: enrollment (direct, or a ring through its phone), authorisation, pairing, revocation
and cohorts (check-in is in :mod:`server.hotpath`; what a device is offered, :mod:`server.offers`).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import delete
from sqlmodel import Session, col, select

from firmware_bundles.manifest import FirmwareRange
from firmware_bundles.messages import CapabilityReport
from server import device_events
from server.auth import Principal, hash_token, new_token
from server.errors import ApiError
from server.models import Cohort, CohortMember, Device, DeviceInstalled, EnrollmentToken
from server.schemas import DevicePublic
from server.state import ServerState


def create_enrollment_token(
    *, session: Session, cohort: str | None, ttl_s: int, max_uses: int
) -> str:
    """A new enrollment token (returned once; only its hash is kept).

    Raises:
        ApiError: 404 if the cohort does not exist; 400 on a bad limit.
    """
    if cohort is not None and session.get(Cohort, cohort) is None:
        raise ApiError(404, f"no cohort {cohort!r}")
    if max_uses < 1 or ttl_s < 1:
        raise ApiError(400, "max_uses and ttl_s must be at least 1")
    token = new_token("enroll")
    session.add(
        EnrollmentToken(
            token_hash=hash_token(token),
            cohort=cohort,
            max_uses=max_uses,
            expires_at=datetime.now(UTC) + timedelta(seconds=ttl_s),
        )
    )
    session.commit()
    return token


def enroll(
    *,
    session: Session,
    state: ServerState,
    enroll_token: str,
    device_id: str,
    capabilities: CapabilityReport,
    relay_id: str | None = None,
) -> str:
    """Enroll a device and return its credential (shown once).

    Raises:
        ApiError: 401 for a bad, expired or used-up token; 409 if the id is taken; 400 if the
            hardware id is not in the catalogue.
    """
    now = datetime.now(UTC)
    token = session.exec(
        select(EnrollmentToken).where(EnrollmentToken.token_hash == hash_token(enroll_token))
    ).first()
    if token is None or token.revoked:
        raise ApiError(401, "enrollment token is not valid")
    if token.expires_at <= now:
        raise ApiError(401, "enrollment token has expired")
    if token.uses >= token.max_uses:
        raise ApiError(401, f"enrollment token is used up ({token.max_uses} uses)")
    if session.get(Device, device_id) is not None:
        raise ApiError(409, f"device {device_id} is already enrolled")
    if capabilities.hardware_id not in state.catalogue.targets:
        raise ApiError(
            400,
            f"unknown hardware id {capabilities.hardware_id!r}; known: "
            + ", ".join(sorted(state.catalogue.targets)),
        )
    credential = new_token("device")
    token.uses += 1
    session.add(token)
    session.add(
        Device(
            id=device_id,
            **capabilities.model_dump(exclude={"links"}),
            credential_hash=hash_token(credential),
            relay_id=relay_id,
            enrolled_at=now,
        )
    )
    session.flush()
    if token.cohort is not None:
        session.add(CohortMember(cohort=token.cohort, device_id=device_id))
    device_events.add_enrolled(
        session,
        device_id=device_id,
        hardware_id=capabilities.hardware_id,
        firmware_version=capabilities.firmware_version,
        relay_id=relay_id,
        at=now,
    )
    session.commit()
    return credential


def device_by_credential(session: Session, credential: str) -> Device | None:
    return session.exec(
        select(Device).where(Device.credential_hash == hash_token(credential))
    ).first()


def authorise_device(caller: Device, device_id: str, session: Session) -> Device:
    """The device ``device_id`` if ``caller`` may act for it: itself, or as its paired relay.

    Raises:
        ApiError: 403 otherwise; 404 if it does not exist (only said to its relay).
    """
    if caller.id == device_id:
        return caller
    device = session.get(Device, device_id)
    if device is None or device.relay_id != caller.id or device.revoked:
        raise ApiError(403, f"device {caller.id} may not act for device {device_id}")
    return device


def cohort_devices(session: Session, cohort: Cohort) -> list[str]:
    """Members of a cohort: static members plus devices matching its filter."""
    members = {
        m.device_id
        for m in session.exec(select(CohortMember).where(CohortMember.cohort == cohort.name))
    }
    if cohort.filter:
        query = select(Device)
        for field in ("generation", "platform", "hardware_id"):
            if field in cohort.filter:
                query = query.where(getattr(Device, field) == cohort.filter[field])
        firmware = FirmwareRange(
            minimum=cohort.filter.get("firmware_min", "0.0.0"),
            below=cohort.filter.get("firmware_below"),
        )
        members |= {d.id for d in session.exec(query) if firmware.contains(d.firmware_version)}
    return sorted(members)


def cohorts_members(session: Session, names: list[str]) -> frozenset[str] | None:
    """The devices of any of the cohorts ``names`` (None when no cohort is named: any device);
    an unknown name adds nobody."""
    if not names:
        return None
    members: set[str] = set()
    for name in names:
        cohort = session.get(Cohort, name)
        if cohort is not None:
            members |= set(cohort_devices(session, cohort))
    return frozenset(members)


def device_public(device: Device) -> DevicePublic:
    """A device as the API shows it (no credential hash)."""
    return DevicePublic.model_validate(device.model_dump(exclude={"credential_hash"}))


def get_device(session: Session, device_id: str) -> Device:
    """Raises: ApiError 404 if there is no such device."""
    device = session.get(Device, device_id)
    if device is None:
        raise ApiError(404, f"no device {device_id}")
    return device


def list_devices(session: Session) -> list[Device]:
    return list(session.exec(select(Device).order_by(Device.id)))


def unpair(*, session: Session, who: Principal, device_id: str) -> None:
    """End ``device_id``'s pairing: by the device itself, its relay, or an operator.

    Raises:
        ApiError: 404 for an unknown device, 403 for anyone else.
    """
    device = get_device(session, device_id)
    if who.kind == "api":
        who.require("operate")
    elif who.name not in (device.id, device.relay_id):
        raise ApiError(403, f"device {who.name} may not unpair {device_id}")
    if device.relay_id is not None:
        by = f"operator:{who.name}" if who.kind == "api" else f"device:{who.name}"
        device_events.add_unpaired(
            session,
            device_id=device.id,
            relay_id=device.relay_id,
            reason=f"unpaired by {by}",
            at=datetime.now(UTC),
        )
    device.relay_id = None
    session.add(device)
    session.commit()


def revoke(*, session: Session, device_id: str) -> None:
    """Revoke a device's credential; its pairings end with it.

    Raises:
        ApiError: 404 for an unknown device.
    """
    device = get_device(session, device_id)
    now = datetime.now(UTC)
    if not device.revoked:
        device_events.add_revoked(session, device_id=device_id, at=now)
    # A revoked device runs nothing the fleet counts.
    session.exec(delete(DeviceInstalled).where(col(DeviceInstalled.device_id) == device_id))
    device.revoked = True
    session.add(device)
    for paired in session.exec(select(Device).where(Device.relay_id == device_id)):
        device_events.add_unpaired(
            session, device_id=paired.id, relay_id=device_id, reason="relay revoked", at=now
        )
        paired.relay_id = None
        session.add(paired)
    session.commit()


#: Keys a cohort filter may have.
FILTER_KEYS = {"generation", "platform", "hardware_id", "firmware_min", "firmware_below"}


def create_cohort(
    *, session: Session, name: str, filter: dict[str, str] | None, members: list[str]
) -> None:
    """A cohort of static members and/or an attribute filter.

    Raises:
        ApiError: 400 for unknown filter keys, 409 if it exists, 404 for unknown members.
    """
    unknown = set(filter or {}) - FILTER_KEYS
    if unknown:
        raise ApiError(
            400, f"unknown filter keys {sorted(unknown)}; allowed: {sorted(FILTER_KEYS)}"
        )
    if session.get(Cohort, name) is not None:
        raise ApiError(409, f"cohort {name} exists")
    missing = [d for d in members if session.get(Device, d) is None]
    if missing:
        raise ApiError(404, f"no such devices: {missing[:5]}")
    session.add(Cohort(name=name, filter=filter, created_at=datetime.now(UTC)))
    session.flush()
    for device_id in members:
        session.add(CohortMember(cohort=name, device_id=device_id))
    session.commit()


def list_cohorts(session: Session) -> list[tuple[Cohort, list[str]]]:
    """Every cohort with its members' ids."""
    return [
        (c, cohort_devices(session, c)) for c in session.exec(select(Cohort).order_by(Cohort.name))
    ]
