"""Devices: enrollment (direct, or a ring through its phone), authorisation, cohorts, and the
release state offered to each hardware id (check-in itself is in :mod:`server.hotpath`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlmodel import Session, col, select

from firmware_bundles.manifest import FirmwareRange
from firmware_bundles.messages import CapabilityReport
from server.auth import hash_token, new_token
from server.errors import ApiError
from server.models import Bundle, Cohort, CohortMember, Device, EnrollmentToken, ModelVersion
from server.registry import current_versions
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
            hardware_id=capabilities.hardware_id,
            generation=capabilities.generation,
            platform=capabilities.platform,
            firmware_version=capabilities.firmware_version,
            onnxruntime_version=capabilities.onnxruntime_version,
            free_flash_bytes=capabilities.free_flash_bytes,
            free_ram_bytes=capabilities.free_ram_bytes,
            credential_hash=hash_token(credential),
            relay_id=relay_id,
            enrolled_at=now,
        )
    )
    if token.cohort is not None:
        session.flush()
        session.add(CohortMember(cohort=token.cohort, device_id=device_id))
    session.commit()
    return credential


def device_by_credential(session: Session, credential: str) -> Device | None:
    return session.exec(
        select(Device).where(Device.credential_hash == hash_token(credential))
    ).first()


def authorise_device(caller: Device, target_id: str, session: Session) -> Device:
    """The device ``target_id`` if ``caller`` may act for it: itself, or as its paired relay.

    Raises:
        ApiError: 403 otherwise; 404 if it does not exist (only said to its relay).
    """
    if caller.id == target_id:
        return caller
    target = session.get(Device, target_id)
    if target is None or target.relay_id != caller.id or target.revoked:
        raise ApiError(403, f"device {caller.id} may not act for device {target_id}")
    return target


@dataclass(frozen=True)
class Offer:
    """What a model offers one hardware id: the current version and its bundle, if any."""

    version: str
    release_counter: int
    sha256: str | None = None
    length: int = 0
    firmware_min: str = "0.0.0"
    firmware_below: str | None = None


def _offer(session: Session, version_id: int, hardware_id: str) -> Offer | None:
    version = session.get(ModelVersion, version_id)
    if version is None:
        return None
    bundle = session.exec(
        select(Bundle).where(Bundle.version_id == version_id, Bundle.target_id == hardware_id)
    ).first()
    if bundle is None:
        return Offer(version.version, version.release_counter)
    return Offer(
        version.version,
        version.release_counter,
        bundle.sha256,
        bundle.length,
        bundle.firmware_min,
        bundle.firmware_below,
    )


def offers_for(session: Session, state: ServerState, hardware_id: str) -> dict[str, Offer]:
    """Current version and bundle per model for ``hardware_id``, cached for a short time.

    Every check-in needs this and it changes only on release, withdraw or publish, which clear
    the cache of the worker that made them; other workers see a change within
    ``release_cache_ttl_s``.
    """
    cached: dict[str, Offer] | None = state.cached(hardware_id)
    if cached is not None:
        return cached
    wanted = current_versions(session, hardware_id)
    bundles = {
        b.version_id: b
        for b in session.exec(
            select(Bundle).where(
                col(Bundle.version_id).in_([v.id for v in wanted.values()]),
                Bundle.target_id == hardware_id,
            )
        )
    }
    offers = {}
    for model, version in wanted.items():
        b = bundles.get(version.id or -1)
        offers[model] = (
            Offer(version.version, version.release_counter)
            if b is None
            else Offer(
                version.version,
                version.release_counter,
                b.sha256,
                b.length,
                b.firmware_min,
                b.firmware_below,
            )
        )
    state.cache(hardware_id, offers)
    return offers


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


def device_public(device: Device) -> dict[str, Any]:
    """A device as the API shows it (no credential hash)."""
    data = device.model_dump(exclude={"credential_hash"})
    for key in ("enrolled_at", "last_seen"):
        if data.get(key) is not None:
            data[key] = data[key].isoformat()
    return data
