"""FastAPI dependencies: the server state, a database session, and who is calling."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlmodel import Session, select

from server.auth import Principal, bearer, hash_token
from server.errors import ApiError
from server.fleet import device_by_credential
from server.models import ApiToken, Device
from server.state import ServerState


def get_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.fleet
    return state


StateDep = Annotated[ServerState, Depends(get_state)]


def get_session(state: StateDep) -> Iterator[Session]:
    with Session(state.engine, expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_principal(
    session: SessionDep, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    """An operator token or a device credential.

    Raises:
        ApiError: 401 if missing, unknown or revoked.
    """
    token = bearer(authorization)
    if token.startswith("efd_"):
        device = device_by_credential(session, token)
        if device is None or device.revoked:
            raise ApiError(401, "device credential is not valid or was revoked")
        return Principal(kind="device", name=device.id)
    row = session.exec(select(ApiToken).where(ApiToken.token_hash == hash_token(token))).first()
    if row is None or row.revoked:
        raise ApiError(401, "API token is not valid or was revoked")
    return Principal(kind="api", name=row.name, role=row.role)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def get_device(
    session: SessionDep, authorization: Annotated[str | None, Header()] = None
) -> Device:
    """The calling device.

    Raises:
        ApiError: 401 for anything but a valid device credential.
    """
    token = bearer(authorization)
    device = device_by_credential(session, token)
    if device is None or device.revoked:
        raise ApiError(401, "a valid device credential is required")
    return device


DeviceDep = Annotated[Device, Depends(get_device)]


def _requires(action: str) -> Callable[[Principal], Principal]:
    def dependency(principal: PrincipalDep) -> Principal:
        principal.require(action)
        return principal

    return dependency


#: Callers allowed each kind of action; checked before the body is read or validated.
ReaderDep = Annotated[Principal, Depends(_requires("read"))]
PublisherDep = Annotated[Principal, Depends(_requires("publish"))]
OperatorDep = Annotated[Principal, Depends(_requires("operate"))]
AdminDep = Annotated[Principal, Depends(_requires("admin"))]
