"""Credentials: hashed API tokens with roles, device credentials, and the checks on each route.

Roles are ordered by what they may do: ``viewer`` reads; ``publisher`` also uploads bundles;
``operator`` also releases, pins, withdraws and manages devices, cohorts and enrollment tokens;
``admin`` also manages API tokens. A device may act only for itself, or as the relay (the paired
phone) of another device.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from sqlmodel import Session, col, select

from server.errors import ApiError
from server.models import ApiToken

Role = Literal["admin", "publisher", "operator", "viewer"]
ROLES: tuple[Role, ...] = ("admin", "publisher", "operator", "viewer")
#: Which roles may perform each kind of action.
PERMISSIONS: dict[str, set[str]] = {
    "read": {"admin", "publisher", "operator", "viewer"},
    "publish": {"admin", "publisher"},
    "operate": {"admin", "operator"},
    "admin": {"admin"},
}
TOKEN_PREFIX = {"api": "efa_", "device": "efd_", "enroll": "efe_"}


def new_token(kind: str) -> str:
    """A fresh random token with a prefix saying what it is."""
    return TOKEN_PREFIX[kind] + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """What the database stores: the SHA-256 of the token (tokens are random, so no salt)."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: an operator with a role, or a device."""

    kind: Literal["api", "device"]
    name: str
    role: str | None = None

    def require(self, action: str) -> None:
        """Raise 403 unless this principal's role allows ``action``.

        Raises:
            ApiError: 403 naming the role needed.
        """
        if self.kind != "api" or self.role not in PERMISSIONS[action]:
            allowed = ", ".join(sorted(PERMISSIONS[action]))
            who = f"role {self.role}" if self.kind == "api" else f"device {self.name}"
            raise ApiError(403, f"{who} may not {action}; needs one of: {allowed}")


def bearer(header: str | None) -> str:
    """The token from an ``Authorization: Bearer`` header.

    Raises:
        ApiError: 401 if absent or malformed.
    """
    if not header or not header.lower().startswith("bearer "):
        raise ApiError(401, "missing Authorization: Bearer <token>")
    return header[7:].strip()


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a, b)


def create_api_token(*, session: Session, name: str, role: str) -> tuple[ApiToken, str]:
    """A new API token with ``role``: its row and the token itself (shown once).

    Raises:
        ApiError: 400 for an unknown role.
    """
    if role not in ROLES:
        raise ApiError(400, f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    token = new_token("api")
    row = ApiToken(name=name, role=role, token_hash=hash_token(token), created_at=datetime.now(UTC))
    session.add(row)
    session.commit()
    return row, token


def api_token_by_value(session: Session, token: str) -> ApiToken | None:
    return session.exec(select(ApiToken).where(ApiToken.token_hash == hash_token(token))).first()


def list_api_tokens(session: Session) -> list[ApiToken]:
    return list(session.exec(select(ApiToken).order_by(col(ApiToken.id))))


def revoke_api_token(*, session: Session, token_id: int) -> None:
    """Raises: ApiError 404 for an unknown token."""
    row = session.get(ApiToken, token_id)
    if row is None:
        raise ApiError(404, f"no token {token_id}")
    row.revoked = True
    session.add(row)
    session.commit()
