"""Devices: enrollment, relay enrollment and pairing, check-in, pins, listing, revocation."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel
from sqlmodel import select

from firmware_bundles.messages import CapabilityReport, CheckInRequest, CheckInResponse
from server import fleet, hotpath, registry, telemetry
from server.auth import bearer
from server.deps import DeviceDep, OperatorDep, PrincipalDep, ReaderDep, SessionDep, StateDep
from server.errors import ApiError
from server.models import Device

router = APIRouter(prefix="/v1/devices", tags=["devices"])


class EnrollRequest(BaseModel):
    enroll_token: str
    device_id: str
    capabilities: CapabilityReport


class EnrollResult(BaseModel):
    device_id: str
    credential: str
    relay_id: str | None = None


# Declared first: every device calls it on a timer, and routes are matched in order.
@router.post("/{device_id}/check-in", response_model=CheckInResponse)
async def check_in(device_id: str, body: CheckInRequest, request: Request) -> Response:
    """Report state with a fresh nonce; get one director-signed assignment set carrying it.

    Authorised by the device's credential (``Authorization: Bearer``), or its paired relay's.
    Runs on the event loop (no threadpool hop); see :mod:`server.hotpath`.
    """
    state = request.app.state.fleet
    credential = bearer(request.headers.get("authorization"))
    answer = await hotpath.check_in(state, credential, device_id, body)
    return Response(answer, media_type="application/json")


@router.post("/enroll", status_code=201)
def enroll(body: EnrollRequest, session: SessionDep, state: StateDep) -> EnrollResult:
    """Enroll with an enrollment token; returns the device's credential (shown once)."""
    credential = fleet.enroll(
        session=session,
        state=state,
        enroll_token=body.enroll_token,
        device_id=body.device_id,
        capabilities=body.capabilities,
    )
    return EnrollResult(device_id=body.device_id, credential=credential)


@router.post("/{relay_id}/relay-enroll", status_code=201)
def relay_enroll(
    relay_id: str, body: EnrollRequest, session: SessionDep, state: StateDep, caller: DeviceDep
) -> EnrollResult:
    """A phone enrolls its ring: the ring is recorded as paired with the phone."""
    if caller.id != relay_id:
        raise ApiError(403, f"device {caller.id} may not relay as {relay_id}")
    credential = fleet.enroll(
        session=session,
        state=state,
        enroll_token=body.enroll_token,
        device_id=body.device_id,
        capabilities=body.capabilities,
        relay_id=caller.id,
    )
    return EnrollResult(device_id=body.device_id, credential=credential, relay_id=caller.id)


@router.delete("/{device_id}/pairing")
def unpair(device_id: str, session: SessionDep, who: PrincipalDep) -> dict[str, Any]:
    """End a pairing: the device itself, its relay, or an operator."""
    device = session.get(Device, device_id)
    if device is None:
        raise ApiError(404, f"no device {device_id}")
    if who.kind == "api":
        who.require("operate")
    elif who.name not in (device.id, device.relay_id):
        raise ApiError(403, f"device {who.name} may not unpair {device_id}")
    device.relay_id = None
    session.add(device)
    session.commit()
    return {"device_id": device_id, "relay_id": None}


@router.get("")
def list_devices(session: SessionDep, who: ReaderDep) -> list[dict[str, Any]]:
    return [fleet.device_public(d) for d in session.exec(select(Device).order_by(Device.id))]


@router.get("/{device_id}")
def show_device(device_id: str, session: SessionDep, who: ReaderDep) -> dict[str, Any]:
    device = session.get(Device, device_id)
    if device is None:
        raise ApiError(404, f"no device {device_id}")
    return {**fleet.device_public(device), "telemetry": telemetry.completeness(session, device_id)}


@router.post("/{device_id}/revoke")
def revoke(device_id: str, session: SessionDep, who: OperatorDep) -> dict[str, Any]:
    """Revoke a device's credential; its pairings end with it."""
    device = session.get(Device, device_id)
    if device is None:
        raise ApiError(404, f"no device {device_id}")
    device.revoked = True
    session.add(device)
    for paired in session.exec(select(Device).where(Device.relay_id == device_id)):
        paired.relay_id = None
        session.add(paired)
    session.commit()
    return {"device_id": device_id, "revoked": True}


class PinRequest(BaseModel):
    version: str | None


@router.put("/{device_id}/pins/{model}")
def pin(
    device_id: str,
    model: str,
    body: PinRequest,
    session: SessionDep,
    state: StateDep,
    who: OperatorDep,
) -> dict[str, Any]:
    """Hold a device on a version (``null`` releases the pin)."""
    if session.get(Device, device_id) is None:
        raise ApiError(404, f"no device {device_id}")
    registry.pin(session=session, device_id=device_id, model=model, version=body.version)
    state.release_cache.clear()
    return {"device_id": device_id, "model": model, "version": body.version}
