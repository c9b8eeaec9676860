"""Credentials and cohorts: API tokens (admin), enrollment tokens and cohorts (operator)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlmodel import select

from server import fleet
from server.auth import ROLES, hash_token, new_token
from server.deps import AdminDep, OperatorDep, ReaderDep, SessionDep, StateDep
from server.errors import ApiError
from server.models import ApiToken, Cohort, CohortMember, Device

router = APIRouter(prefix="/v1", tags=["admin"])


class TokenRequest(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    role: str


@router.post("/tokens", status_code=201)
def create_token(body: TokenRequest, session: SessionDep, who: AdminDep) -> dict[str, Any]:
    """Create an API token; the token is shown once."""
    if body.role not in ROLES:
        raise ApiError(400, f"unknown role {body.role!r}; roles: {', '.join(ROLES)}")
    token = new_token("api")
    row = ApiToken(
        name=body.name, role=body.role, token_hash=hash_token(token), created_at=datetime.now(UTC)
    )
    session.add(row)
    session.commit()
    return {"id": row.id, "name": row.name, "role": row.role, "token": token}


@router.get("/tokens")
def list_tokens(session: SessionDep, who: AdminDep) -> list[dict[str, Any]]:
    return [
        {
            "id": t.id,
            "name": t.name,
            "role": t.role,
            "revoked": t.revoked,
            "created_at": t.created_at.isoformat(),
        }
        for t in session.exec(select(ApiToken))
    ]


@router.delete("/tokens/{token_id}")
def revoke_token(token_id: int, session: SessionDep, who: AdminDep) -> dict[str, Any]:
    row = session.get(ApiToken, token_id)
    if row is None:
        raise ApiError(404, f"no token {token_id}")
    row.revoked = True
    session.add(row)
    session.commit()
    return {"id": token_id, "revoked": True}


class EnrollmentTokenRequest(BaseModel):
    cohort: str | None = None
    ttl_s: int | None = None
    max_uses: int = 1


@router.post("/enrollment-tokens", status_code=201)
def create_enrollment_token(
    body: EnrollmentTokenRequest, session: SessionDep, state: StateDep, who: OperatorDep
) -> dict[str, Any]:
    token = fleet.create_enrollment_token(
        session=session,
        cohort=body.cohort,
        max_uses=body.max_uses,
        ttl_s=body.ttl_s or state.settings.enrollment_token_ttl_s,
    )
    return {"token": token, "cohort": body.cohort, "max_uses": body.max_uses}


class CohortRequest(BaseModel):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._-]+$")
    filter: dict[str, str] | None = None
    members: list[str] = Field(default_factory=list)


FILTER_KEYS = {"generation", "platform", "hardware_id", "firmware_min", "firmware_below"}


@router.post("/cohorts", status_code=201)
def create_cohort(body: CohortRequest, session: SessionDep, who: OperatorDep) -> dict[str, Any]:
    """A cohort of static members and/or an attribute filter."""
    unknown = set(body.filter or {}) - FILTER_KEYS
    if unknown:
        raise ApiError(
            400, f"unknown filter keys {sorted(unknown)}; allowed: {sorted(FILTER_KEYS)}"
        )
    if session.get(Cohort, body.name) is not None:
        raise ApiError(409, f"cohort {body.name} exists")
    missing = [d for d in body.members if session.get(Device, d) is None]
    if missing:
        raise ApiError(404, f"no such devices: {missing[:5]}")
    session.add(Cohort(name=body.name, filter=body.filter, created_at=datetime.now(UTC)))
    session.flush()
    for device_id in body.members:
        session.add(CohortMember(cohort=body.name, device_id=device_id))
    session.commit()
    return {"name": body.name, "filter": body.filter, "members": body.members}


@router.get("/cohorts")
def list_cohorts(session: SessionDep, who: ReaderDep) -> list[dict[str, Any]]:
    return [
        {"name": c.name, "filter": c.filter, "devices": fleet.cohort_devices(session, c)}
        for c in session.exec(select(Cohort).order_by(Cohort.name))
    ]
