"""Bundles and models: publish, download, list, release, withdraw."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel

from server import registry
from server.deps import OperatorDep, PrincipalDep, PublisherDep, ReaderDep, SessionDep, StateDep
from server.errors import ApiError
from server.models import Bundle

router = APIRouter(prefix="/v1", tags=["registry"])


class PublishResult(BaseModel):
    sha256: str
    model: str
    version: str
    target_id: str
    length: int


@router.post("/bundles", status_code=201)
async def publish(
    request: Request, session: SessionDep, state: StateDep, who: PublisherDep
) -> PublishResult:
    """Upload a bundle (the raw archive bytes as the body); verified before it is stored."""
    data = await request.body()
    if len(data) > state.settings.max_bundle_upload_bytes:
        raise ApiError(413, f"bundle over {state.settings.max_bundle_upload_bytes} bytes")
    bundle = registry.publish(session=session, state=state, data=data, publisher=who.name)
    state.release_cache.clear()
    manifest = bundle.manifest
    return PublishResult(
        sha256=bundle.sha256,
        model=manifest["name"],
        version=manifest["version"],
        target_id=bundle.target_id,
        length=bundle.length,
    )


@router.post("/bundles/{sha256}/hil-report")
async def attach_hil_report(
    sha256: str, request: Request, session: SessionDep, state: StateDep, who: PublisherDep
) -> dict[str, Any]:
    """Attach a rig report (signed by the root's ``hil`` role) to a published bundle; a passing
    one lets the version be released where the server requires HIL reports."""
    data = await request.body()
    if len(data) > state.settings.max_hil_report_bytes:
        raise ApiError(413, f"HIL report over {state.settings.max_hil_report_bytes} bytes")
    return registry.attach_hil_report(session=session, state=state, sha256=sha256, data=data)


@router.get("/bundles/{sha256}", response_model=None)
def download(
    sha256: str,
    session: SessionDep,
    state: StateDep,
    who: PrincipalDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """A bundle's bytes: immutable, with ETag and Range (resume)."""
    if who.kind == "api":
        who.require("read")
    bundle = session.get(Bundle, sha256)
    if bundle is None:
        raise ApiError(404, f"no bundle {sha256}")
    etag = f'"{sha256}"'
    if if_none_match == etag:
        return Response(status_code=304, headers={"ETag": etag})
    return FileResponse(
        state.blobs.path(sha256),
        media_type="application/x-tar",
        headers={"ETag": etag, "Cache-Control": "public, max-age=31536000, immutable"},
    )


@router.get("/models")
def list_models(session: SessionDep, who: ReaderDep) -> list[dict[str, Any]]:
    return registry.list_models(session)


@router.get("/models/{name}")
def show_model(name: str, session: SessionDep, who: ReaderDep) -> dict[str, Any]:
    for model in registry.list_models(session):
        if model["name"] == name:
            return model
    raise ApiError(404, f"no model {name}")


class ReleaseRequest(BaseModel):
    target: str | None = None


@router.post("/models/{name}/versions/{version}/release")
def release(
    name: str,
    version: str,
    body: ReleaseRequest,
    session: SessionDep,
    state: StateDep,
    who: OperatorDep,
) -> dict[str, Any]:
    """Make a version current for one target, or for every target it has a bundle for."""
    state.release_cache.clear()
    targets = registry.release(
        session=session,
        model=name,
        version=version,
        target=body.target,
        by=who.name,
        state=state,
    )
    return {"model": name, "version": version, "released_for": targets}


@router.post("/models/{name}/versions/{version}/withdraw")
def withdraw(
    name: str, version: str, session: SessionDep, state: StateDep, who: OperatorDep
) -> dict[str, Any]:
    """Stop assigning a version; its devices get the previous released version."""
    registry.withdraw(session=session, model=name, version=version)
    state.release_cache.clear()
    return {"model": name, "version": version, "withdrawn": True}
