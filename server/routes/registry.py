"""Bundles and models: publish, download, list, release, withdraw, confirm.

Uploads are read on the event loop against their cap; verification and the database work run in
a worker thread, so check-ins sharing the loop go on while a large bundle is checked.
"""

from __future__ import annotations

from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, Header, Path, Request, Response
from pydantic import BaseModel, Field

from server import confirmations, references, registry
from server import lineage as lineage_of
from server.auth import PERMISSIONS
from server.bodies import body_pieces, read_body
from server.deps import OperatorDep, PrincipalDep, PublisherDep, ReaderDep, SessionDep, StateDep
from server.lineage_schemas import Lineage
from server.ranges import RangeFileResponse
from server.schemas import (
    REFUSALS,
    REFUSALS_AS_JSON,
    TOO_LARGE,
    HilReportAttached,
    ModelPublic,
    PublishResult,
    ReferenceAttached,
    Released,
    RequestBody,
    Withdrawn,
)

router = APIRouter(prefix="/v1", tags=["registry"], responses=REFUSALS)
#: Downloads answer bytes, so their refusals are declared as JSON explicitly.
downloads = APIRouter(prefix="/v1", tags=["registry"], responses=REFUSALS_AS_JSON)
#: A bundle's hash in a URL path: ``{sha256}`` in the published routes (docs/server-api.md).
BundleSha256Path = Annotated[str, Path(alias="sha256")]


def _raw_body(media_type: str, description: str) -> dict[str, Any]:
    """OpenAPI for a route that reads its body as bytes."""
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {media_type: {"schema": {"type": "string", "format": "binary"}}},
        }
    }


@router.post(
    "/bundles",
    status_code=201,
    responses=TOO_LARGE,
    openapi_extra=_raw_body("application/octet-stream", "The bundle archive's bytes."),
)
async def publish(
    request: Request, session: SessionDep, state: StateDep, who: PublisherDep
) -> PublishResult:
    """Upload a bundle (the raw archive bytes as the body); verified before it is stored."""
    upload = registry.BundleUpload(state)
    try:
        cap = state.settings.max_bundle_upload_bytes
        async for piece in body_pieces(request, cap, "bundle"):
            # Hashing runs off the event loop that check-ins share (hashlib frees the GIL).
            await to_thread.run_sync(upload.feed, piece)
        bundle = await to_thread.run_sync(
            lambda: registry.publish(
                session=session, state=state, upload=upload, publisher=who.name
            )
        )
    finally:
        upload.discard()
    manifest = bundle.manifest
    return PublishResult(
        sha256=bundle.sha256,
        model=manifest["name"],
        version=manifest["version"],
        target_id=bundle.target_id,
        length=bundle.length,
    )


@router.post(
    "/bundles/{sha256}/hil-report",
    responses=TOO_LARGE,
    openapi_extra=_raw_body("application/json", "A rig report signed by the root's hil role."),
)
async def attach_hil_report(
    bundle_sha256: BundleSha256Path,
    request: Request,
    session: SessionDep,
    state: StateDep,
    who: PublisherDep,
) -> HilReportAttached:
    """Attach a rig report (signed by the root's ``hil`` role) to a published bundle; a passing
    one lets the version be released where the server requires HIL reports."""
    data = await read_body(request, state.settings.max_hil_report_bytes, "HIL report")
    return await to_thread.run_sync(
        lambda: registry.attach_hil_report(
            session=session, state=state, bundle_sha256=bundle_sha256, data=data
        )
    )


@router.post(
    "/bundles/{sha256}/reference",
    responses=TOO_LARGE,
    openapi_extra=_raw_body(
        "application/octet-stream",
        "The reference file (docs/bundle-format.md) of a bundle that detaches it.",
    ),
)
async def attach_reference(
    sha256: str, request: Request, session: SessionDep, state: StateDep, who: PublisherDep
) -> ReferenceAttached:
    """Upload the reference histograms a bundle detaches (its manifest pins their SHA-256 and
    length); drift against the reference needs them."""
    data = await read_body(request, state.settings.max_reference_bytes, "reference file")
    return await to_thread.run_sync(
        lambda: references.attach_reference(session=session, sha256=sha256, data=data)
    )


class TarResponse(Response):
    media_type = "application/x-tar"


_BYTES = {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}}


@downloads.get(
    "/bundles/{sha256}",
    response_class=TarResponse,
    responses={
        200: {"description": "The whole bundle.", "content": _BYTES},
        206: {"description": "The byte ranges asked for (Range).", "content": _BYTES},
        304: {"description": "Not modified (If-None-Match)."},
        416: {"description": "No range asked for is satisfiable.", "content": {"text/plain": {}}},
    },
)
def download(
    bundle_sha256: BundleSha256Path,
    session: SessionDep,
    state: StateDep,
    who: PrincipalDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """A bundle's bytes: immutable, with ETag and Range (resume)."""
    if who.kind == "api":
        who.require("read")
    registry.get_bundle(session, bundle_sha256)
    etag = f'"{bundle_sha256}"'
    if if_none_match == etag:
        return Response(status_code=304, headers={"ETag": etag})
    return RangeFileResponse(
        state.blobs.path(bundle_sha256),
        media_type="application/x-tar",
        headers={"ETag": etag, "Cache-Control": "public, max-age=31536000, immutable"},
    )


@router.get("/models")
def list_models(session: SessionDep, who: ReaderDep) -> list[ModelPublic]:
    return [ModelPublic.model_validate(m) for m in registry.list_models(session)]


@router.get("/models/{name}")
def show_model(name: str, session: SessionDep, who: ReaderDep) -> ModelPublic:
    return ModelPublic.model_validate(registry.get_model(session, name))


@router.get("/models/{name}/versions/{version}/lineage")
def lineage(
    name: str, version: str, session: SessionDep, state: StateDep, who: ReaderDep
) -> Lineage:
    """A version from its training source and data hashes (the manifest's provenance), through
    the converter's variant, accuracy and size per target, the bundles' SHA-256s and HIL
    verdicts, its releases, confirmations and rollouts with dates, to the devices running it
    per day and its field figures over the last seven days."""
    return lineage_of.lineage(
        session,
        name,
        version,
        root=state.trusted.root,
        relative_accuracy=state.settings.telemetry_relative_accuracy,
        min_devices=state.settings.min_devices_shown,
        privileged=who.role in PERMISSIONS["operate"],
    )


class ReleaseRequest(RequestBody):
    hardware_id: str | None = Field(default=None, alias="target")


@router.post("/models/{name}/versions/{version}/release")
def release(
    name: str,
    version: str,
    body: ReleaseRequest,
    session: SessionDep,
    state: StateDep,
    who: OperatorDep,
) -> Released:
    """Make a version current for one target, or for every target it has a bundle for."""
    hardware_ids = registry.release(
        session=session,
        model=name,
        version=version,
        hardware_id=body.hardware_id,
        by=who.name,
        state=state,
    )
    return Released(model=name, version=version, released_for=hardware_ids)


@router.post("/models/{name}/versions/{version}/withdraw")
def withdraw(name: str, version: str, session: SessionDep, who: OperatorDep) -> Withdrawn:
    """Stop assigning a version; its devices get the previous released version."""
    registry.withdraw(session=session, model=name, version=version)
    return Withdrawn(model=name, version=version, withdrawn=True)


class ConfirmRequest(RequestBody):
    hardware_id: str | None = Field(
        default=None, description="Only this hardware id (default: every one it has a bundle for)."
    )


class Confirmed(BaseModel):
    model: str
    version: str
    release_counter: int
    confirmed_for: list[str]
    confirmed_by: str


@router.post("/models/{name}/versions/{version}/confirm")
def confirm(
    name: str,
    version: str,
    session: SessionDep,
    state: StateDep,
    who: OperatorDep,
    body: ConfirmRequest | None = None,
) -> Confirmed:
    """Confirm a version for every device of a hardware id: each check-in answer then names its
    release counter, and devices that ran it raise their anti-rollback floor to it, so nobody
    (not even the director) takes them below it again (docs/rollback.md). A release alone does
    not confirm."""
    hardware_id = None if body is None else body.hardware_id
    found, targets = confirmations.confirm(
        session,
        name,
        version,
        None if hardware_id is None else [hardware_id],
        who.name,
        catalogue=state.catalogue,
    )
    return Confirmed(
        model=name,
        version=version,
        release_counter=found.release_counter,
        confirmed_for=targets,
        confirmed_by=who.name,
    )
