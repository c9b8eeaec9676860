"""How a dashboard request becomes a response: who is asking (session cookie, or a bearer token
for a JSON twin), the page or its JSON twin, and refusals as a page (or the API's problem JSON)
with the matching status, never a stack trace. Errors are mapped here, once."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlmodel import Session

from server.auth import Principal
from server.deps import get_principal
from server.errors import ApiError
from server.state import ServerState
from server.ui import session as ui_session
from server.ui.session import SessionError, UiSession

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"
#: Pages load only our own files; styles may be inline (uPlot sizes its elements with them).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
TITLES = {400: "Bad request", 401: "Log in", 403: "Not allowed", 404: "Not found", 409: "Conflict"}

#: What a table shows for a figure that does not exist (an en dash).
MISSING = "\u2013"

Build = Callable[[Session, Principal], dict[str, Any]]


def _number(value: Any) -> str:
    """A figure as a table shows it: integers whole, other numbers to 4 significant digits."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else MISSING
    return str(value)


def _when(value: str | None) -> str:
    """An ISO 8601 instant as a table shows it: to the second, UTC."""
    if not value:
        return MISSING
    moment = datetime.fromisoformat(value).astimezone(UTC)
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC"


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(), auto_reload=False
    )
    env.filters["num"] = _number
    env.filters["pct"] = lambda v: MISSING if v is None else f"{100 * v:.1f}%"
    env.filters["short"] = lambda sha: sha[:12] if sha else MISSING
    env.filters["when"] = _when
    #: Decisions a rollout's page lists unless asked for all (``?decisions=all``).
    env.globals["decisions_shown"] = 20
    return env


ENV = _environment()


def state_of(request: Request) -> ServerState:
    state: ServerState = request.app.state.fleet
    return state


def own_origin(request: Request) -> str:
    return f"{request.url.scheme}://{request.url.netloc}"


def secret(request: Request) -> bytes:
    """The session secret, loaded once per application."""
    app_state = request.app.state
    if getattr(app_state, "ui_secret", None) is None:
        app_state.ui_secret = ui_session.load_secret(state_of(request).settings)
    value: bytes = app_state.ui_secret
    return value


def current_session(request: Request, db: Session) -> UiSession:
    """Raises: SessionError when the request carries no valid session."""
    return ui_session.verify(
        secret(request), request.cookies.get(ui_session.COOKIE), db, now=ui_session.now_utc()
    )


def render(
    request: Request,
    template: str,
    *,
    status: int = 200,
    ui: UiSession | None = None,
    **context: Any,
) -> HTMLResponse:
    html = ENV.get_template(template).render(request=request, ui=ui, **context)
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)


def problem(status: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The API's refusal body."""
    return JSONResponse({"detail": reason}, status_code=status, headers=headers)


def error_page(
    request: Request, status: int, reason: str, *, ui: UiSession | None, login: bool = False
) -> HTMLResponse:
    return render(
        request,
        "error.html",
        status=status,
        ui=ui,
        title=TITLES.get(status, "Error"),
        status_code=status,
        reason=reason,
        login_url=login_url(request) if login else None,
    )


def login_url(request: Request) -> str:
    return "/ui/login?next=" + quote(request.url.path, safe="/")


def refuse_session(request: Request, exc: SessionError, *, twin: bool) -> Response:
    """No valid session: log in (a redirect when there was none at all), or say why (401)."""
    if twin:
        return problem(401, exc.reason)
    if request.cookies.get(ui_session.COOKIE) is None:
        return RedirectResponse(login_url(request), status_code=303)
    response = error_page(request, 401, exc.reason, ui=None, login=True)
    response.delete_cookie(ui_session.COOKIE, path=ui_session.COOKIE_PATH)
    return response


def page(request: Request, *, twin: bool, template: str, build: Build, **context: Any) -> Response:
    """A page, or its JSON twin, of the data ``build`` makes for the caller.

    The twin also takes ``Authorization: Bearer`` (an API token), as the API does.
    """
    with state_of(request).sessions() as db:
        ui: UiSession | None = None
        try:
            if twin and request.headers.get("authorization"):
                who = get_principal(db, request.headers["authorization"])
            else:
                ui = current_session(request, db)
                who = ui.principal
        except SessionError as exc:
            return refuse_session(request, exc, twin=twin)
        except ApiError as exc:
            return problem(exc.status, exc.reason)
        try:
            who.require("read")
            data = build(db, who)
        except ApiError as exc:
            if twin:
                return problem(exc.status, exc.reason)
            return error_page(request, exc.status, exc.reason, ui=ui)
    if twin:
        return JSONResponse(data, headers={"Cache-Control": "no-store"})
    return render(request, template, ui=ui, data=data, **context)


def chart_json(spec: dict[str, Any]) -> str:
    """A chart spec for a ``<script type="application/json">`` block (non-finite numbers as
    null; ``<``, ``>`` and ``&`` escaped so the block cannot be closed early)."""
    text = json.dumps(spec, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


ENV.filters["chart_json"] = chart_json
