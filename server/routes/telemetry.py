"""Telemetry: batch upload (idempotent) and rollups."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from firmware_bundles.errors import SchemaError
from firmware_bundles.messages import TelemetryBatch
from server import fleet, telemetry
from server.deps import DeviceDep, ReaderDep, SessionDep, StateDep
from server.errors import ApiError

router = APIRouter(prefix="/v1", tags=["telemetry"])


@router.post("/devices/{device_id}/telemetry")
async def upload(
    device_id: str, request: Request, session: SessionDep, state: StateDep, caller: DeviceDep
) -> dict[str, Any]:
    """Upload a batch of windows for a device (itself, or the ring it relays for)."""
    device = fleet.authorise_device(caller, device_id, session)
    body = await request.body()
    if len(body) > state.settings.max_telemetry_batch_bytes:
        raise ApiError(413, f"batch over {state.settings.max_telemetry_batch_bytes} bytes")
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
    return {"accepted": accepted, "replay": not accepted, "windows": len(batch.windows)}


@router.get("/telemetry/rollups")
def rollups(
    session: SessionDep,
    who: ReaderDep,
    state: StateDep,
    response: Response,
    model: str | None = None,
) -> list[dict[str, Any]]:
    """Rollups; stored rows that fail the checks are skipped and counted in the
    ``Edgefleet-Skipped-Rows`` header."""
    found = telemetry.rollups(
        session, model, relative_accuracy=state.settings.telemetry_relative_accuracy
    )
    response.headers["Edgefleet-Skipped-Rows"] = str(found.skipped_rows)
    return found.rows
