"""Devices: enrollment, relay enrollment and pairing, check-in, pins, listing, revocation.

Every path parameter that names a device is a :data:`~firmware_bundles.messages.DeviceId`, so an
id outside the one rule is refused (422) where it enters, as in bodies.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from firmware_bundles.messages import CapabilityReport, CheckInRequest, DeviceId
from server import device_events, device_history, fleet, fleet_summary, hotpath, registry, telemetry
from server.auth import bearer
from server.bodies import json_body, json_body_openapi
from server.deps import DeviceDep, OperatorDep, PrincipalDep, ReaderDep, SessionDep, StateDep
from server.errors import ApiError
from server.event_schemas import DeviceEvents, DeviceHistory
from server.fleet_summary import FleetSummary
from server.metrics import parse_time
from server.routes.metrics import FromQuery, ToQuery
from server.schemas import (
    REFUSALS,
    TOO_LARGE,
    CheckInAnswer,
    DeviceDetail,
    DevicePublic,
    DeviceRevoked,
    EnrollResult,
    PairingEnded,
    PinResult,
    RequestBody,
)

router = APIRouter(prefix="/v1/devices", tags=["devices"], responses=REFUSALS)
#: The fleet as a whole.
fleet_router = APIRouter(prefix="/v1/fleet", tags=["devices"], responses=REFUSALS)


class EnrollRequest(RequestBody):
    enroll_token: str
    device_id: DeviceId
    capabilities: CapabilityReport


# Declared first: every device calls it on a timer, and routes are matched in order.
@router.post(
    "/{device_id}/check-in",
    response_class=Response,
    responses={
        200: {"model": CheckInAnswer, "description": "A director-signed assignment set."},
        **TOO_LARGE,
    },
    openapi_extra=json_body_openapi(CheckInRequest),
)
async def check_in(device_id: DeviceId, request: Request) -> Response:
    """Report state with a fresh nonce; get one director-signed assignment set carrying it.

    Authorised by the device's credential (``Authorization: Bearer``), or its paired relay's.
    Runs on the event loop (no threadpool hop); see :mod:`server.hotpath`.
    """
    state = request.app.state.fleet
    body = await json_body(request, CheckInRequest, state.settings.max_check_in_bytes, "check-in")
    credential = bearer(request.headers.get("authorization"))
    answer = await hotpath.check_in(state, credential, device_id, body)
    return Response(answer, media_type="application/json")


@router.post("/enroll", status_code=201)
def enroll(body: EnrollRequest, session: SessionDep, state: StateDep) -> EnrollResult:
    """Enroll with an enrollment token; returns the device's credential (shown once)."""
    return _enroll(session, state, body)


@router.post("/{relay_id}/relay-enroll", status_code=201)
def relay_enroll(
    relay_id: DeviceId,
    body: EnrollRequest,
    session: SessionDep,
    state: StateDep,
    caller: DeviceDep,
) -> EnrollResult:
    """A phone enrolls its ring: the ring is recorded as paired with the phone."""
    if caller.id != relay_id:
        raise ApiError(403, f"device {caller.id} may not relay as {relay_id}")
    return _enroll(session, state, body, relay_id=caller.id)


def _enroll(
    session: SessionDep, state: StateDep, body: EnrollRequest, relay_id: str | None = None
) -> EnrollResult:
    """Enroll ``body``'s device (paired with ``relay_id`` when a relay enrolls it)."""
    credential = fleet.enroll(
        session=session,
        state=state,
        enroll_token=body.enroll_token,
        device_id=body.device_id,
        capabilities=body.capabilities,
        relay_id=relay_id,
    )
    return EnrollResult(device_id=body.device_id, credential=credential, relay_id=relay_id)


@router.delete("/{device_id}/pairing")
def unpair(device_id: DeviceId, session: SessionDep, who: PrincipalDep) -> PairingEnded:
    """End a pairing: the device itself, its relay, or an operator."""
    fleet.unpair(session=session, who=who, device_id=device_id)
    return PairingEnded(device_id=device_id)


@router.get("")
def list_devices(session: SessionDep, who: ReaderDep) -> list[DevicePublic]:
    return [fleet.device_public(d) for d in fleet.list_devices(session)]


@router.get("/{device_id}")
def show_device(device_id: DeviceId, session: SessionDep, who: ReaderDep) -> DeviceDetail:
    device = fleet.device_public(fleet.get_device(session, device_id))
    return DeviceDetail(**device.model_dump(), telemetry=telemetry.completeness(session, device_id))


@router.get("/{device_id}/events")
def list_events(
    device_id: DeviceId,
    session: SessionDep,
    who: ReaderDep,
    start: FromQuery = None,
    to: ToQuery = None,
    cursor: Annotated[
        str | None,
        Query(
            max_length=40,
            pattern=r"^\d{1,17}-\d{1,19}$",
            description="From an earlier answer's next_cursor: the page after it",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=device_events.MAX_EVENTS_PER_PAGE)] = 100,
) -> DeviceEvents:
    """A device's events, newest first: installs and their outcomes, switches, reverts,
    firmware and pairing changes, enrolment (recorded when its reported state changes, not at
    every check-in). ``from``/``to`` bound the event time."""
    fleet.get_device(session, device_id)
    events, next_cursor = device_events.list_events(
        session,
        device_id,
        start=parse_time(start, end=False),
        end=parse_time(to, end=True),
        cursor=cursor,
        limit=limit,
    )
    return DeviceEvents(
        device_id=device_id,
        events=[device_events.public(e) for e in events],
        next_cursor=next_cursor,
    )


@router.get("/{device_id}/history")
def history(device_id: DeviceId, session: SessionDep, who: ReaderDep) -> DeviceHistory:
    """A device's story: what decided its assignments (releases, rollout arms, pins), the
    changes it reported over time, its pairing and its last telemetry."""
    return device_history.build(device_history.load(session, device_id))


@fleet_router.get("/summary")
def summary(
    session: SessionDep,
    who: ReaderDep,
    silent_after_h: Annotated[
        float, Query(gt=0, le=24 * 365, description="Hours without a check-in that make silent")
    ] = 24,
) -> FleetSummary:
    """Devices by hardware id, platform and firmware with their last contact; devices by the
    model version they report running; devices not seen for ``silent_after_h`` hours; install
    outcomes per day over the last 30 days."""
    return fleet_summary.summary(
        session, now=datetime.now(UTC), silent_after=timedelta(hours=silent_after_h)
    )


@router.post("/{device_id}/revoke")
def revoke(device_id: DeviceId, session: SessionDep, who: OperatorDep) -> DeviceRevoked:
    """Revoke a device's credential; its pairings end with it."""
    fleet.revoke(session=session, device_id=device_id)
    return DeviceRevoked(device_id=device_id, revoked=True)


class PinRequest(RequestBody):
    version: str | None


@router.put("/{device_id}/pins/{model}")
def pin(
    device_id: DeviceId, model: str, body: PinRequest, session: SessionDep, who: OperatorDep
) -> PinResult:
    """Hold a device on a version (``null`` releases the pin)."""
    registry.pin(session=session, device_id=device_id, model=model, version=body.version)
    return PinResult(device_id=device_id, model=model, version=body.version)
