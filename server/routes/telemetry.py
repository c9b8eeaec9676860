"""Telemetry: batch upload (idempotent) and rollups.

Upload is a hot path (every phone, on a timer and in sync bursts): it runs on the event loop
without the ORM; see :func:`upload`.
"""

from __future__ import annotations

from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Request, Response

from firmware_bundles.errors import SchemaError
from firmware_bundles.messages import DeviceId, TelemetryBatch
from firmware_bundles.window_builder import TelemetryLayout
from server import telemetry
from server.auth import bearer, hash_token
from server.bodies import read_body
from server.deps import AdminDep, ReaderDep, SessionDep, StateDep
from server.errors import ApiError
from server.fleet import authorise_device, device_by_credential
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
#: The batch as the formats define it (the route reads raw bytes, against a cap).
_BATCH_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": inline_refs(TelemetryBatch.model_json_schema())}
        },
    }
}


@router.post(
    "/devices/{device_id}/telemetry",
    response_class=Response,
    responses={
        200: {"model": TelemetryAccepted, "description": "Stored, or a replay of a stored batch."},
        **TOO_LARGE,
    },
    openapi_extra=_BATCH_BODY,
)
async def upload(device_id: DeviceId, request: Request) -> Response:
    """Upload a batch of windows for a device (itself, or the ring it relays for).

    Authorised by the device's credential (``Authorization: Bearer``), or its paired relay's,
    before the body is read. Runs on the event loop, as check-in does: the lookup and the append
    are shared with the uploads arriving at the same time (:mod:`server.ingest_store`); a large
    batch is decoded in a worker thread.
    """
    state: ServerState = request.app.state.fleet
    store = state.ingest_store
    credential = bearer(request.headers.get("authorization"))
    hardware_id = await store.device(hash_token(credential), device_id)
    if hardware_id is None:
        # Refused: which refusal (401 or 403) is worked out as every device route does.
        hardware_id = await to_thread.run_sync(_refusal, state, credential, device_id)
    body = await read_body(request, state.settings.max_telemetry_batch_bytes, "batch")
    if len(body) > DECODE_IN_LOOP_BYTES:
        batch = await to_thread.run_sync(_decode, body, state.settings.max_windows_per_batch)
    else:
        batch = _decode(body, state.settings.max_windows_per_batch)
    named = telemetry.bundles_named(batch)
    layouts = telemetry.cached_layouts(named)
    if layouts is None:
        layouts = await to_thread.run_sync(_load_layouts, state, named)
    problems = telemetry.windows_problems(
        batch, device_id, hardware_id, layouts, state.settings.telemetry_relative_accuracy
    )
    if problems:
        raise telemetry.refusal(problems)
    accepted = await store.append(telemetry.upload_of(device_id, hardware_id, batch))
    answer = TelemetryAccepted(accepted=accepted, replay=not accepted, windows=len(batch.windows))
    return Response(answer.model_dump_json(), media_type="application/json")


#: Bodies up to this size are decoded in the event loop (a 10-window batch, about 5 KB, takes
#: about 0.2 ms); larger ones in a worker thread, so one big batch never stalls check-ins.
DECODE_IN_LOOP_BYTES = 32 * 1024


def _decode(body: bytes, max_windows: int) -> TelemetryBatch:
    try:
        batch = TelemetryBatch.from_bytes(body)
    except SchemaError as exc:
        raise ApiError(422, str(exc)) from exc
    if len(batch.windows) > max_windows:
        raise ApiError(413, f"batch has {len(batch.windows)} windows, over {max_windows}")
    return batch


def _refusal(state: ServerState, credential: str, device_id: str) -> str:
    """The refusal of a credential the hot lookup found no device for (raises it), or the
    device's hardware id if it was let in since."""
    with state.sessions() as session:
        caller = device_by_credential(session, credential)
        if caller is None or caller.revoked:
            raise ApiError(401, "a valid device credential is required")
        return authorise_device(caller, device_id, session).hardware_id


def _load_layouts(state: ServerState, named: set[str]) -> dict[str, tuple[str, TelemetryLayout]]:
    with state.sessions() as session:
        return telemetry.bundle_layouts(session, named)


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
