"""Telemetry: batch upload (idempotent) and rollups.

The body is read on the event loop against its cap; parsing and the database work run in a worker
thread, so check-ins sharing the loop are not held up by a large batch.
"""

from __future__ import annotations

from typing import Any

from anyio import CapacityLimiter, to_thread
from fastapi import APIRouter, Request, Response
from sqlmodel import Session

from firmware_bundles.errors import SchemaError
from firmware_bundles.messages import DeviceId, TelemetryBatch
from server import telemetry
from server.bodies import read_body
from server.deps import ActingForDep, AdminDep, ReaderDep, SessionDep, StateDep
from server.errors import ApiError
from server.models import Device
from server.schemas import (
    REFUSALS,
    TOO_LARGE,
    Rollup,
    TelemetryAccepted,
    TelemetryErased,
    inline_refs,
)
from server.state import ServerState

router = APIRouter(prefix="/v1", tags=["telemetry"], responses=REFUSALS)
#: Ingests at once per worker: an ingest only appends (rows no other upload touches), so several
#: overlap their database round trips; a few suffice, as decoding holds the GIL.
_INGEST = CapacityLimiter(4)

#: The batch as the formats define it (the route reads raw bytes, against a cap).
_BATCH_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": inline_refs(TelemetryBatch.model_json_schema())}
        },
    }
}


@router.post("/devices/{device_id}/telemetry", responses=TOO_LARGE, openapi_extra=_BATCH_BODY)
async def upload(
    device_id: DeviceId,
    request: Request,
    session: SessionDep,
    state: StateDep,
    device: ActingForDep,
) -> TelemetryAccepted:
    """Upload a batch of windows for a device (itself, or the ring it relays for)."""
    body = await read_body(request, state.settings.max_telemetry_batch_bytes, "batch")
    return await to_thread.run_sync(_ingest, session, state, device, body, limiter=_INGEST)


def _ingest(session: Session, state: ServerState, device: Device, body: bytes) -> TelemetryAccepted:
    try:
        batch = TelemetryBatch.from_bytes(body)
    except SchemaError as exc:
        raise ApiError(422, str(exc)) from exc
    if len(batch.windows) > state.settings.max_windows_per_batch:
        raise ApiError(
            413,
            f"batch has {len(batch.windows)} windows, over {state.settings.max_windows_per_batch}",
        )
    accepted = telemetry.ingest(
        session=session,
        device=device,
        batch=batch,
        relative_accuracy=state.settings.telemetry_relative_accuracy,
    )
    return TelemetryAccepted(accepted=accepted, replay=not accepted, windows=len(batch.windows))


@router.get("/telemetry/rollups")
def rollups(
    session: SessionDep,
    who: ReaderDep,
    state: StateDep,
    response: Response,
    model: str | None = None,
) -> list[Rollup]:
    """Rollups; stored rows that fail the checks are skipped and counted in the
    ``Edgefleet-Skipped-Rows`` header."""
    found = telemetry.rollups(
        session, model, relative_accuracy=state.settings.telemetry_relative_accuracy
    )
    response.headers["Edgefleet-Skipped-Rows"] = str(found.skipped_rows)
    return [Rollup.model_validate(r) for r in found.rows]


@router.delete("/devices/{device_id}/telemetry")
def erase_device_telemetry(
    device_id: DeviceId, session: SessionDep, state: StateDep, who: AdminDep
) -> TelemetryErased:
    """Erase every stored window, rollup and batch record of a device (health data): every
    aggregate changes by exactly its contribution. Admin only."""
    if session.get(Device, device_id) is None:
        raise ApiError(404, f"no device {device_id}")
    erased = telemetry.erase_device(
        session, device_id, relative_accuracy=state.settings.telemetry_relative_accuracy
    )
    return TelemetryErased(
        device_id=device_id, windows=erased.windows, rollups=erased.rollups, batches=erased.batches
    )
