"""Dashboard sessions: a stateless signed cookie, its CSRF token, and the Origin check.

The cookie holds ``TOKEN_ID.EXPIRES.NONCE.SIGNATURE`` where the signature is an HMAC-SHA256, under
a server secret, of the API token's id, the expiry and a random nonce: never the token itself.
Each request checks the signature, the expiry and that the token still exists unrevoked, so
revoking a token ends its sessions. The CSRF token is a second HMAC of the same fields (one per
login); every action must send it (htmx sends it as ``X-CSRF-Token``) and come from our own origin.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlmodel import Session

from server.auth import Principal
from server.config import Settings
from server.errors import ApiError, ConfigError, ServerError
from server.models import ApiToken

COOKIE = "edgefleet_session"
COOKIE_PATH = "/ui"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
SECRET_FILE = "ui-session.key"
_VERSION = b"v1"


class SessionError(ServerError):
    """No usable session: ``expired`` says whether it was a valid one that ran out."""

    def __init__(self, reason: str, *, expired: bool = False) -> None:
        self.reason = reason
        self.expired = expired
        super().__init__(reason)


@dataclass(frozen=True)
class UiSession:
    """A verified session: who, until when, and the CSRF token of this login."""

    principal: Principal
    token_id: int
    expires: int
    csrf: str


def load_secret(settings: Settings) -> bytes:
    """The configured secret, else the one in the data directory (created there on first use,
    readable by the owner only; every worker on the data directory reads the same file).

    Raises:
        ConfigError: If the file holds too short a secret.
    """
    if settings.ui_session_secret is not None:
        return settings.ui_session_secret.get_secret_value().encode()
    path = Path(settings.data_dir) / SECRET_FILE
    if not path.exists():
        # Written whole to a temporary file, then linked into place: another worker starting at
        # the same moment either wins the link (and both read its secret) or finds it complete.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ui-session.")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_urlsafe(48).encode())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
    secret = path.read_bytes().strip()
    if len(secret) < 32:
        raise ConfigError(f"{path} holds fewer than 32 bytes; delete it to make a new one")
    return secret


def _mac(secret: bytes, purpose: bytes, token_id: int, expires: int, nonce: str) -> str:
    message = b"|".join(
        [_VERSION, purpose, str(token_id).encode(), str(expires).encode(), nonce.encode()]
    )
    digest = hmac.new(secret, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def issue(secret: bytes, token_id: int, *, now: datetime, ttl_s: int) -> str:
    """A new cookie value for API token ``token_id``, valid ``ttl_s`` from ``now``."""
    expires = int(now.timestamp()) + ttl_s
    nonce = secrets.token_urlsafe(12)
    return f"{token_id}.{expires}.{nonce}.{_mac(secret, b'session', token_id, expires, nonce)}"


def verify(secret: bytes, value: str | None, db: Session, *, now: datetime) -> UiSession:
    """The session a cookie value stands for.

    Raises:
        SessionError: Absent, malformed, forged, expired (``expired=True``), or its token was
            revoked or deleted.
    """
    if not value:
        raise SessionError("not logged in")
    parts = value.split(".")
    if len(parts) != 4 or not parts[0].isdigit() or not parts[1].isdigit():
        raise SessionError("the session cookie is malformed")
    token_id, expires, nonce, signature = int(parts[0]), int(parts[1]), parts[2], parts[3]
    if token_id >= 2**31 or not hmac.compare_digest(
        signature, _mac(secret, b"session", token_id, expires, nonce)
    ):
        raise SessionError("the session cookie is not one this server signed")
    if expires <= now.timestamp():
        raise SessionError("your session has expired", expired=True)
    token = db.get(ApiToken, token_id)
    if token is None or token.revoked:
        raise SessionError("the API token of this session was revoked")
    return UiSession(
        principal=Principal(kind="api", name=token.name, role=token.role),
        token_id=token_id,
        expires=expires,
        csrf=_mac(secret, b"csrf", token_id, expires, nonce),
    )


def check_action(
    session: UiSession,
    *,
    origin: str | None,
    referer: str | None,
    own_origin: str,
    csrf: str | None,
) -> None:
    """Refuse an action not sent from our own pages with this session's CSRF token.

    Raises:
        ApiError: 403 naming what is missing or wrong.
    """
    check_origin(origin=origin, referer=referer, own_origin=own_origin)
    if not csrf or not hmac.compare_digest(csrf, session.csrf):
        raise ApiError(403, "the CSRF token is missing or wrong; reload the page and try again")


def check_origin(*, origin: str | None, referer: str | None, own_origin: str) -> None:
    """Raises: ApiError 403 unless Origin (or, without it, Referer) is this server."""
    if origin is not None:
        if origin != own_origin:
            raise ApiError(403, f"cross-origin request from {origin} refused")
        return
    if referer is None or not (referer == own_origin or referer.startswith(own_origin + "/")):
        raise ApiError(403, "request without Origin or Referer from this server refused")


def now_utc() -> datetime:
    return datetime.now(UTC)
