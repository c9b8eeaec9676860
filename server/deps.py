"""FastAPI dependencies: the server state, a database session, and who is calling."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlmodel import Session

from firmware_bundles.messages import DeviceId
from server.auth import Principal, api_token_by_value, bearer
from server.errors import ApiError
from server.fleet import authorise_device, device_by_credential
from server.models import Device
from server.state import ServerState


def get_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.fleet
    return state


StateDep = Annotated[ServerState, Depends(get_state)]


def get_session(state: StateDep) -> Iterator[Session]:
    with state.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def _end_read(session: Session) -> None:
    """End the credential lookup's transaction, so its pooled connection (SQLite has one) is not
    held while the route waits on a slow upload's body; the objects read stay loaded."""
    session.commit()


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
        _end_read(session)
        if device is None or device.revoked:
            raise ApiError(401, "device credential is not valid or was revoked")
        return Principal(kind="device", name=device.id)
    row = api_token_by_value(session, token)
    _end_read(session)
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
    _end_read(session)
    if device is None or device.revoked:
        raise ApiError(401, "a valid device credential is required")
    return device


DeviceDep = Annotated[Device, Depends(get_device)]


def get_acting_for(device_id: DeviceId, caller: DeviceDep, session: SessionDep) -> Device:
    """The device named in the path, if the caller may act for it (itself, or as its relay).

    Raises:
        ApiError: 403 otherwise.
    """
    device = authorise_device(caller, device_id, session)
    _end_read(session)
    return device


#: The device a device route acts on, checked before the body is read.
ActingForDep = Annotated[Device, Depends(get_acting_for)]


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
