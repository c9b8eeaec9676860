"""Credentials and cohorts: API tokens (admin), enrollment tokens and cohorts (operator)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import Field

from firmware_bundles.messages import DeviceId
from server import auth, fleet
from server.auth import Role
from server.deps import AdminDep, OperatorDep, ReaderDep, SessionDep, StateDep
from server.schemas import (
    REFUSALS,
    CohortDevices,
    CohortPublic,
    EnrollmentTokenCreated,
    RequestBody,
    TokenCreated,
    TokenPublic,
    TokenRevoked,
    json_int,
)

router = APIRouter(prefix="/v1", tags=["admin"], responses=REFUSALS)


class TokenRequest(RequestBody):
    name: str = Field(min_length=1, max_length=100)
    role: Role


@router.post("/tokens", status_code=201)
def create_token(body: TokenRequest, session: SessionDep, who: AdminDep) -> TokenCreated:
    """Create an API token; the token is shown once."""
    row, token = auth.create_api_token(session=session, name=body.name, role=body.role)
    assert row.id is not None
    return TokenCreated(id=row.id, name=row.name, role=row.role, token=token)


@router.get("/tokens")
def list_tokens(session: SessionDep, who: AdminDep) -> list[TokenPublic]:
    return [
        TokenPublic.model_validate(t, from_attributes=True) for t in auth.list_api_tokens(session)
    ]


@router.delete("/tokens/{token_id}")
def revoke_token(token_id: int, session: SessionDep, who: AdminDep) -> TokenRevoked:
    auth.revoke_api_token(session=session, token_id=token_id)
    return TokenRevoked(id=token_id, revoked=True)


class EnrollmentTokenRequest(RequestBody):
    cohort: str | None = None
    #: Default: the server's ``enrollment_token_ttl_s``; at most ten years.
    ttl_s: json_int(1, 10 * 365 * 24 * 3600) | None = None  # type: ignore[valid-type]
    max_uses: json_int(1, 2**31 - 1) = 1  # type: ignore[valid-type]


@router.post("/enrollment-tokens", status_code=201)
def create_enrollment_token(
    body: EnrollmentTokenRequest, session: SessionDep, state: StateDep, who: OperatorDep
) -> EnrollmentTokenCreated:
    token = fleet.create_enrollment_token(
        session=session,
        cohort=body.cohort,
        max_uses=body.max_uses,
        ttl_s=body.ttl_s or state.settings.enrollment_token_ttl_s,
    )
    return EnrollmentTokenCreated(token=token, cohort=body.cohort, max_uses=body.max_uses)


class CohortFilter(RequestBody):
    """Devices whose attributes match every field given."""

    generation: str | None = None
    platform: str | None = None
    hardware_id: str | None = None
    firmware_min: str | None = None
    firmware_below: str | None = None


class CohortRequest(RequestBody):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._-]+$")
    filter: CohortFilter | None = None
    members: list[DeviceId] = Field(default_factory=list)


@router.post("/cohorts", status_code=201)
def create_cohort(body: CohortRequest, session: SessionDep, who: OperatorDep) -> CohortPublic:
    """A cohort of static members and/or an attribute filter."""
    filter = None if body.filter is None else body.filter.model_dump(exclude_none=True)
    fleet.create_cohort(session=session, name=body.name, filter=filter, members=body.members)
    return CohortPublic(name=body.name, filter=filter, members=body.members)


@router.get("/cohorts")
def list_cohorts(session: SessionDep, who: ReaderDep) -> list[CohortDevices]:
    return [
        CohortDevices(name=c.name, filter=c.filter, devices=devices)
        for c, devices in fleet.list_cohorts(session)
    ]
